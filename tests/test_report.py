from minimoe.report import markdown_table


def test_markdown_table():
    md = markdown_table([{"a": "x|y", "b": 1234.5}], {"a": "name", "b": "value:"}, {"b": ",.0f"})
    assert md.splitlines() == ["| name | value |", "|---|---:|", "| x\\|y | 1,234 |"]
