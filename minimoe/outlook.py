"""The article's outlook (claim F1), beside dated public milestones, and each prediction judged by its own date.

Every milestone names its public source (a paper's arXiv id or the maker's announcement). The verdicts are ours,
written down with the milestones they rest on, so a reader can disagree with a judgement and see exactly where.
"""
from __future__ import annotations

import datetime as dt
import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Milestone:
    date: dt.date  # first public release (paper or announcement); day 1 where only the month is certain
    name: str
    what: str
    source: str
    kind: str  # "moe", "multimodal", "scale", "attention", "reasoning"


MILESTONES = (
    Milestone(dt.date(2017, 1, 1), "Sparsely-gated MoE", "an LSTM with thousands of experts and a top-k gate",
              "Shazeer et al., arXiv:1701.06538", "moe"),
    Milestone(dt.date(2020, 6, 1), "GShard", "600B-parameter MoE translation model, experts sharded over devices",
              "Lepikhin et al., arXiv:2006.16668", "moe"),
    Milestone(dt.date(2021, 1, 1), "Switch Transformer", "top-1 routing; 1.6T parameters, sparse",
              "Fedus et al., arXiv:2101.03961", "moe"),
    Milestone(dt.date(2021, 12, 1), "GLaM", "1.2T parameters, 97B active per token",
              "Du et al., arXiv:2112.06905", "moe"),
    Milestone(dt.date(2023, 3, 1), "GPT-4", "accepts images and text; architecture not disclosed",
              "OpenAI, arXiv:2303.08774", "multimodal"),
    Milestone(dt.date(2023, 12, 1), "Gemini 1.0", "trained jointly on text, images, audio and video",
              "Gemini Team, arXiv:2312.11805", "multimodal"),
    Milestone(dt.date(2023, 12, 1), "Mixtral 8x7B", "open-weight MoE, 8 experts, top-2, 47B / 13B active",
              "Mistral AI announcement; Jiang et al., arXiv:2401.04088", "moe"),
    Milestone(dt.date(2024, 1, 1), "DeepSeekMoE", "fine-grained and shared experts",
              "Dai et al., arXiv:2401.06066", "moe"),
    Milestone(dt.date(2024, 5, 1), "DeepSeek-V2", "multi-head latent attention; 236B / 21B active",
              "DeepSeek-AI, arXiv:2405.04434", "attention"),
    Milestone(dt.date(2024, 5, 1), "GPT-4o", "one model for text, audio and images in and out",
              "OpenAI announcement, May 2024", "multimodal"),
    Milestone(dt.date(2024, 12, 1), "DeepSeek-V3", "671B / 37B active, trained on 14.8T tokens",
              "DeepSeek-AI, arXiv:2412.19437", "moe"),
    Milestone(dt.date(2025, 1, 1), "DeepSeek-R1", "reasoning trained by reinforcement learning on V3",
              "DeepSeek-AI, arXiv:2501.12948", "reasoning"),
    Milestone(dt.date(2025, 4, 1), "Llama 4", "open-weight MoE models, natively multimodal",
              "Meta announcement, April 2025", "moe"),
    Milestone(dt.date(2025, 7, 1), "Kimi K2", "open-weight MoE with about 1T parameters, 32B active",
              "Moonshot AI announcement, July 2025", "scale"),
)


@dataclass(frozen=True)
class Prediction:
    year: int
    claim: str  # the article's prediction, translated
    verdict: str  # "came true", "came true in part", "not checkable", "not yet due"
    evidence: tuple[str, ...]  # names of MILESTONES it rests on
    why: str


# F1: the article's timeline (section 6), judged by its own dates. Verdicts are ours; the reasons say why.
PREDICTIONS = (
    Prediction(2023, "MoE architectures become mainstream", "came true in part", ("Mixtral 8x7B", "DeepSeekMoE",
               "DeepSeek-V3", "Llama 4"),
               "The first widely used open MoE arrived in December 2023. MoE became the usual design for large "
               "open models through 2024-2025, a year or two after the article's date."),
    Prediction(2024, "unified multimodal modelling", "came true", ("Gemini 1.0", "GPT-4o"),
               "Gemini 1.0 (December 2023) and GPT-4o (May 2024) were each trained as one model across modalities."),
    Prediction(2025, "real-time inference with trillion-parameter models", "came true in part", ("Kimi K2",),
               "An open MoE of about 1T parameters was served interactively in 2025, but only 32B of its "
               "parameters are active per token: the 'trillion' counts parameters stored, not parameters computed."),
    Prediction(2026, "self-evolving architectures", "not checkable", (),
               "The article does not define the term; no public release we can cite names an architecture that "
               "changes itself, so there is nothing to check it against."),
    Prediction(2027, "early general intelligence", "not yet due", (),
               "Not due yet, and, like the 2026 item, without a definition or a test that would settle it."),
)


def milestones_by_name() -> dict[str, Milestone]:
    return {m.name: m for m in MILESTONES}


def check() -> None:
    """Every prediction's evidence names a milestone, dated no later than the end of the year after the
    prediction's ("came true" needs evidence by then; "in part" may be later)."""
    known = milestones_by_name()
    for p in PREDICTIONS:
        for name in p.evidence:
            if name not in known:
                raise ValueError(f"prediction {p.year} cites unknown milestone {name!r}")
        if p.verdict == "came true" and not any(known[n].date.year <= p.year for n in p.evidence):
            raise ValueError(f"prediction {p.year} is marked 'came true' without a milestone by {p.year}")


def plot_timeline(ax=None):
    """Milestones as dots on a date axis, one row per kind; the article's predictions as labelled bands."""
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(12, 5))
    day = mdates.date2num  # plain numbers on the x axis: text positions then need no unit conversion
    kinds = sorted({m.kind for m in MILESTONES})
    colours = {"came true": "tab:green", "came true in part": "tab:olive", "not checkable": "tab:grey",
               "not yet due": "tab:blue"}
    for p in PREDICTIONS:
        ax.axvspan(day(dt.date(p.year, 1, 1)), day(dt.date(p.year, 12, 31)), color=colours[p.verdict], alpha=0.12)
        label = "\n".join(textwrap.wrap(f"{p.year}: {p.claim}", 14) + textwrap.wrap(f"({p.verdict})", 14))
        ax.text(day(dt.date(p.year, 7, 1)), len(kinds) + 1.4, label, ha="center", va="top", fontsize=6.5)
    for i, m in enumerate(sorted(MILESTONES, key=lambda m: m.date)):
        y = kinds.index(m.kind)
        ax.plot(day(m.date), y, "o", color="k")
        below = i % 2 and m.date.year >= 2023  # the crowded years: alternate labels above and below the dot
        ax.annotate(m.name, (day(m.date), y), xytext=(0, -12 if below else 6), textcoords="offset points",
                    fontsize=7, rotation=20, ha="left")
    ax.xaxis.set_major_locator(mdates.YearLocator())
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y"))
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_ylim(-0.8, len(kinds) + 1.5)
    ax.set_xlabel("date of first public release")
    ax.set_title("Public milestones (dots) and the article's predictions (bands, coloured by our verdict)")
    return ax
