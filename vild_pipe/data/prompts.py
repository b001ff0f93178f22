"""ViLD's prompt ensemble: 63 templates, filled the way the official implementation fills them.

Rules (DESIGN.md §2, from the official ViLD code): the name is cleaned (`_` -> space, `/` -> " or ",
lower case, trailing dots dropped); `{article}` is "an" before a vowel, else "a"; "This is " goes in front
of every text that starts with "a" or "the" (the official test is a plain `startswith`, so "art of the ..."
becomes "This is art of the ..." too; kept for fidelity).
"""
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def vild_templates() -> tuple:
    """The 63 templates shipped with the package (a copy of shared/vild_prompt_templates.txt)."""
    text = resources.files("vild_pipe.data").joinpath("vild_prompt_templates.txt").read_text()
    return tuple(line for line in text.splitlines() if line.strip())


def clean_name(name: str) -> str:
    return name.replace("_", " ").replace("/", " or ").lower().rstrip(".").strip()


def article(name: str) -> str:
    return "an" if name[:1] in "aeiou" else "a"


def fill_template(template: str, name: str) -> str:
    """One prompt for one category name, with ViLD's "This is " rule applied."""
    name = clean_name(name)
    text = template.format(name, article=article(name))
    if text.startswith("a") or text.startswith("the"):
        text = "This is " + text
    return text


def prompt_texts(name: str, templates=None) -> list:
    """All prompts for one category name: one per template."""
    return [fill_template(t, name) for t in (templates or vild_templates())]
