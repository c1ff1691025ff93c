"""Sphinx extension (loaded through _config.yml, sphinx.local_extensions): two fixes to the book's HTML pages.

1. Offline assets. The pages load the widget renderer, RequireJS and MathJax from _static/offline/ (see _config.yml
   and "Offline reading" in the Makefile). If `make assets` (npm) has not staged them, the build stops here with
   what to run, instead of publishing pages whose widgets and equations never render.

2. Each inline script once. Sphinx 7.4 lists an inline script that an extension adds after the builder starts
   (sphinx-thebe's `const THEBE_JS_URL = ...`, sphinx-togglebutton's selector) twice on every page: once as added,
   once more when it replays the registry before writing (its filename None vs ''). The second `const` is a
   SyntaxError ("Identifier 'THEBE_JS_URL' has already been declared") on every page; the browser test
   (tests_browser/) fails on it. Duplicates are dropped from each page's script list, keeping the first.
"""
from __future__ import annotations

from pathlib import Path

from sphinx.errors import ConfigError

# Files the pages point at (nb_ipywidgets_js, mathjax_path), relative to an html_static_path entry.
REQUIRED = ("offline/widgets-setup.js", "offline/require.js", "offline/widgets/embed-amd.js",
            "offline/mathjax/tex-mml-chtml.js")


def check_offline_assets(app, config):
    if not any("offline-assets" in entry for entry in config.html_static_path):
        return
    roots = [Path(app.confdir, entry) for entry in config.html_static_path]
    missing = [name for name in REQUIRED if not any((root / name).is_file() for root in roots)]
    if missing:
        raise ConfigError(
            f"the book's offline JavaScript is not staged ({', '.join(missing)} missing under "
            f"{', '.join(config.html_static_path)}): run `make assets` (needs npm), or build with `make book`")


def dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen, unique = set(), []
    for js in scripts:
        key = (getattr(js, "filename", js) or "", getattr(js, "priority", None),
               tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app):
    # Before sphinx.builders.html validates html_static_path (priority 800), which only warns and drops the entry.
    app.connect("config-inited", check_offline_assets, priority=700)
    # Late, so the scripts other extensions add for this page (myst-nb's widgets, MathJax) are in the list.
    app.connect("html-page-context", dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
