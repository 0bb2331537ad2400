"""What distinct failure modes share (core/discovery/shared.py): the rule, its numbers, its words,
and where a reader sees it (the CLI and the page)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llm2loss_pipeline.core.discovery.config import DiscoveryConfig
from llm2loss_pipeline.core.discovery.evidence import SHARED_HEADING, SHARED_RULE, discovery_html
from llm2loss_pipeline.core.discovery.shared import MIN_MODES, SharedTrait, shared_traits

N = 400


def _world():
    """400 samples of 40 identities: men (first 160) fail, the rest do not; Smiling is on half
    of everyone, Pointy_Nose on 85% (too common for any lift), Attractive on the men only."""
    index = np.arange(N)
    male = index < 160
    labels = {
        "Male": male,
        "Smiling": index % 2 == 0,
        "Pointy_Nose": index % 20 >= 3,
        "Attractive": male,
        "Goatee": index < 40,
    }
    losses = np.where(male, 1.0, 0.2) + 0.01 * (index % 7)
    clusters = np.array([f"i{i // 10}" for i in index])
    return labels, losses, clusters


def _modes(*matched: np.ndarray) -> list[tuple[int, np.ndarray]]:
    return [(number, np.asarray(m)) for number, m in enumerate(matched, start=1)]


def _traits(modes, labels, losses, clusters, **settings):
    config = DiscoveryConfig(
        **{"min_lift": 1.5, "avoid_subjective": True, "alpha": 0.05, **settings}
    )
    return shared_traits(modes, labels, losses, clusters, config)


def test_a_value_on_most_images_of_most_modes_is_shared_with_the_labels_verdict() -> None:
    labels, losses, clusters = _world()
    men = np.arange(0, 160)
    # three modes of men (each 40 samples, different ones), one of women
    modes = _modes(men[:40], men[40:80], np.r_[men[80:115], 300, 301, 302, 303, 304], [200, 210])
    found = _traits(modes, labels, losses, clusters)
    assert [trait.label for trait in found] == ["Male"]
    male = found[0]
    assert male.modes == (1, 2, 3) and male.n_modes == 4
    assert male.base_rate == pytest.approx(0.4)
    assert male.min_precision == pytest.approx(35 / 40)  # the third mode's share
    assert male.labelled_gap == pytest.approx(losses[:160].mean() - losses[160:].mean())
    assert male.worse and male.labelled_p < 1e-6
    assert male.words == "face of a man"
    assert male.sentence() == (
        "3 of 4 modes (#1, 2, 3) show Male ('face of a man') on at least 88% of their matched "
        "samples, against 40% of all; the samples labelled Male are worse (gap +0.80, p "
        f"{male.labelled_p:.2g})"
    )
    # Attractive is on the same samples, but has no neutral words: never said unprompted
    said = _traits(modes, labels, losses, clusters, avoid_subjective=False)
    assert {trait.label for trait in said} == {"Male", "Attractive"}


def test_what_is_not_shared() -> None:
    labels, losses, clusters = _world()
    men, women = np.arange(0, 160), np.arange(160, N)
    # men in two of four modes: half of them, but fewer than MIN_MODES
    assert MIN_MODES == 3
    two = _modes(men[:40], men[40:80], women[:40], women[40:80])
    assert _traits(two, labels, losses, clusters) == []
    # at least half is needed when there are many modes: 4 of 7, so 3 of 7 is not
    seven = _modes(
        men[:40], men[40:80], men[80:120], *(women[k : k + 40] for k in range(0, 160, 40))
    )
    assert "Male" not in [trait.label for trait in _traits(seven, labels, losses, clusters)]
    # a common value (Pointy_Nose on 85%: no lift of 1.5 is possible) is never shared, even on
    # every matched sample; a value on a minority of the images is not what they are
    pointy = np.flatnonzero(labels["Pointy_Nose"])
    common = _modes(pointy[:40], pointy[40:80], pointy[80:120])
    assert "Pointy_Nose" not in [t.label for t in _traits(common, labels, losses, clusters)]
    goatee_few = np.r_[np.arange(0, 15), women[:25]]  # goatee on 15 of 40 (lift 3.75)
    few = _modes(goatee_few, goatee_few, goatee_few)
    assert "Goatee" not in [t.label for t in _traits(few, labels, losses, clusters)]
    # fewer than MIN_MODES modes, or no labels: nothing to say
    assert _traits(_modes(men[:40], men[40:80]), labels, losses, clusters) == []
    assert _traits(_modes(men[:40], men[40:80], men[80:120]), None, losses, clusters) == []


def test_a_shared_value_whose_people_are_not_worse_says_so() -> None:
    labels, losses, clusters = _world()
    smiling = np.flatnonzero(labels["Smiling"] & ~labels["Male"])
    found = _traits(_modes(smiling[:40], smiling[40:80], smiling[80:120]), labels, losses, clusters)
    trait = next(t for t in found if t.label == "Smiling")
    assert not trait.worse
    assert trait.sentence().endswith(
        f"the samples labelled Smiling are not measurably worse (gap {trait.labelled_gap:+.2f}, "
        f"p {trait.labelled_p:.2g})"
    )


def _male(modes=(2, 4, 5), n_modes=5) -> SharedTrait:
    return SharedTrait(
        "Male", True, "face of a man", modes, n_modes, 0.41, 0.68, 0.29, 2.2e-10, worse=True
    )


def test_discover_prints_what_the_modes_share(capsys) -> None:
    from llm2loss_pipeline.discover_cli import _print_shared

    _print_shared(())
    assert capsys.readouterr().out == ""
    _print_shared((_male(),))
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"{SHARED_HEADING}:"
    assert lines[2] == f"  {_male().sentence()}"
    assert "3 of 5 modes (#2, 4, 5) show Male ('face of a man')" in lines[2]


def test_the_page_lists_what_the_modes_share(tmp_path) -> None:
    import polars as pl

    sheet = tmp_path / "hypothesis-01.png"
    Image.new("RGB", (4, 4), "red").save(sheet)
    table = pl.DataFrame(
        {
            "rank": [1],
            "mode": [1],
            "verdict": ["mode"],
            "description": ["face of a person with a mustache"],
            "shown_as": ["face of a person with a mustache"],
            "source": ["attribute"],
            "kept": [True],
        }
    )
    page = discovery_html(table, {1: sheet}, tmp_path / "a.html", shared=(_male(),)).read_text()
    assert "What the modes share" in page and SHARED_RULE in page
    assert "3 of 5 modes (#2, 4, 5) show Male (&#x27;face of a man&#x27;)" in page
    bare = discovery_html(table, {1: sheet}, tmp_path / "b.html").read_text()
    assert "What the modes share" not in bare
