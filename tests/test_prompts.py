import pytest

from vild_pipe.data.prompts import article, clean_name, fill_template, prompt_texts, vild_templates


def test_ships_the_63_vild_templates():
    templates = vild_templates()
    assert len(templates) == 63
    assert all("{}" in t for t in templates)
    assert any("{article}" in t for t in templates)
    assert templates[0] == "There is {article} {} in the scene."


@pytest.mark.parametrize("name,expected", [("apple", "an"), ("elephant", "an"), ("umbrella", "an"),
                                           ("zebra", "a"), ("hollow square", "a"), ("Orange", "a")])
def test_article(name, expected):
    assert article(name) == expected


def test_names_are_cleaned_like_the_official_code():
    assert clean_name("traffic_light") == "traffic light"
    assert clean_name("Bottle/Cup") == "bottle or cup"
    assert clean_name("frisbee.") == "frisbee"


def test_this_is_goes_before_texts_starting_with_a_or_the():
    assert fill_template("a photo of {article} {}.", "apple") == "This is a photo of an apple."
    assert fill_template("the {} in the scene.", "kite") == "This is the kite in the scene."
    # the official test is a plain startswith("a"), so "art of ..." gets it too
    assert fill_template("art of the {}.", "kite") == "This is art of the kite."
    assert fill_template("There is {article} {} in the scene.", "owl") == "There is an owl in the scene."
    assert fill_template("itap of a {}.", "owl") == "itap of a owl."


def test_prompt_texts_one_per_template():
    texts = prompt_texts("ice_cream")
    assert len(texts) == 63
    assert all("ice cream" in t for t in texts)
    assert "There is an ice cream in the scene." in texts
