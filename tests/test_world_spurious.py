"""world.spurious (core/world/config.py SpuriousConfig): the target becomes rare among
attribute-positive train images while valid and test stay near balanced; worlds without it are
planned exactly as before the key existed (pinned digests, computed before the change), and
`attribute_hair: buzz_cut` draws the men's hair so that its colour shows weakly."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from llm2loss_pipeline.core.config import load_config
from llm2loss_pipeline.core.preflight import preflight
from llm2loss_pipeline.core.world.config import SpuriousConfig, WorldConfig
from llm2loss_pipeline.core.world.generate import image_jobs, plan_world, world_description
from llm2loss_pipeline.core.world.render import ImageJob, render_face

SPURIOUS = {"target": "Blond_Hair", "attribute": "Male", "train_rate": 0.02, "eval_rate": 0.4}


def _plan_digest(config: WorldConfig) -> str:
    plan = plan_world(config)
    rows = [(i.identity, i.slot, i.split, sorted(i.attributes.items())) for i in plan.images]
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:12]


def test_worlds_without_spurious_are_unchanged():
    # the folder name of a world is a hash of this JSON (core/steps/data.world_root)
    default = load_config(None).world
    assert hashlib.sha256(default.model_dump_json().encode()).hexdigest()[:12] == "a6eef928addb"
    assert "spurious" not in WorldConfig().as_json()
    small = WorldConfig(n_identities=30, hard_attributes={"Eyeglasses": 0.5, "Gray_Hair": 0.9})
    assert _plan_digest(small) == "b0e0d41af9b6"
    description = json.dumps(world_description(plan_world(small)), sort_keys=True)
    assert hashlib.sha256(description.encode()).hexdigest()[:12] == "188bc39b9273"


def _rates(config: WorldConfig) -> dict[tuple[int, bool], tuple[int, float]]:
    counts = Counter(
        (image.split, image.attributes["Male"], image.attributes["Blond_Hair"])
        for image in plan_world(config).images
    )
    rates = {}
    for split in range(3):
        for male in (True, False):
            blond, other = counts[(split, male, True)], counts[(split, male, False)]
            rates[(split, male)] = (blond, blond / (blond + other))
    return rates


def test_blond_men_are_rare_in_train_and_near_balanced_in_eval():
    rates = _rates(WorldConfig(spurious=SPURIOUS))
    assert rates[(0, True)][1] == pytest.approx(0.02, abs=0.002)  # train: 14 of 698
    for split in (1, 2):  # valid and test: about the women's rate, and enough to measure
        blond_men, male_rate = rates[(split, True)]
        assert blond_men >= 60
        assert abs(male_rate - rates[(split, False)][1]) < 0.05
    plain = _rates(WorldConfig())
    assert plain[(2, True)][1] < 0.1 and plain[(0, True)][1] == plain[(2, True)][1]
    # women are drawn exactly as without spurious
    assert all(rates[(s, False)] == plain[(s, False)] for s in range(3))


def test_world_json_records_the_rates_by_split():
    described = world_description(plan_world(WorldConfig(spurious=SPURIOUS)))["spurious"]
    assert described["target"] == "Blond_Hair"
    train = described["by_split"]["train"]["with_attribute"]
    assert train["with_target"] == 14 and train["images"] == 698
    assert described["by_split"]["test"]["with_attribute"]["target_rate"] == pytest.approx(
        0.2245, abs=1e-4
    )


def _hair_cue(job: ImageJob) -> float:
    """How much of the image changes when the hair colour changes (to a mid brown): the pixels
    a classifier of the hair colour can read."""
    brown = dataclasses.replace(job.traits, hair_colour=(118, 78, 44))
    shown = np.asarray(render_face(job), dtype=np.float64)
    other = np.asarray(render_face(dataclasses.replace(job, traits=brown)), dtype=np.float64)
    return float(np.abs(shown - other).sum() / 255)


def test_a_buzz_cut_weakens_the_hair_cue_of_men_only():
    plain = WorldConfig(n_identities=60, images_per_identity=3, spurious=SPURIOUS)
    buzz = WorldConfig(
        n_identities=60,
        images_per_identity=3,
        spurious={**SPURIOUS, "attribute_hair": "buzz_cut"},
    )
    plain_plan, buzz_plan = plan_world(plain), plan_world(buzz)
    # who is who, and every image's split and attributes, stay as they were: only the drawing
    assert _plan_digest(plain) == _plan_digest(buzz)
    styles = {t.identity: t.hair_style for t in buzz_plan.identities}
    for before, after in zip(plain_plan.identities, buzz_plan.identities, strict=True):
        if before.attributes["Male"] and before.hair_style != "bald":
            assert after == dataclasses.replace(before, hair_style="buzz")
        else:
            assert after == before
    assert "buzz" in styles.values()
    jobs = {name: image_jobs(plan) for name, plan in (("plain", plain_plan), ("buzz", buzz_plan))}
    blond = {name: [j for j in found if j.attributes["Blond_Hair"]] for name, found in jobs.items()}
    men = {
        name: [_hair_cue(j) for j in js if j.attributes["Male"]][:8] for name, js in blond.items()
    }
    assert len(men["buzz"]) == 8
    # measured: 343 pixels' worth on the men as drawn, 166 with a buzz cut, 791 on the women
    assert np.mean(men["buzz"]) < 0.6 * np.mean(men["plain"])
    assert all(b < p for b, p in zip(men["buzz"], men["plain"], strict=True))
    woman = next(j for j in blond["buzz"] if not j.attributes["Male"])
    assert _hair_cue(woman) > 2 * max(men["buzz"])
    twin = next(j for j in blond["plain"] if j.filename == woman.filename)
    assert render_face(twin).tobytes() == render_face(woman).tobytes()


def test_the_hair_option_is_recorded_only_when_set():
    assert "attribute_hair" not in SpuriousConfig(**SPURIOUS).model_dump()
    plain = world_description(plan_world(WorldConfig(n_identities=20, spurious=SPURIOUS)))
    assert "attribute_hair" not in plain["spurious"] and "attribute_hair" not in str(plain)
    buzz = WorldConfig(n_identities=20, spurious={**SPURIOUS, "attribute_hair": "buzz_cut"})
    assert world_description(plan_world(buzz))["spurious"]["attribute_hair"] == "buzz_cut"
    assert buzz.as_json()["spurious"]["attribute_hair"] == "buzz_cut"


@pytest.mark.parametrize(
    ("spurious", "needle"),
    [
        ({**SPURIOUS, "target": "Blonde"}, "spurious.target 'Blonde' is not a CelebA attribute"),
        ({**SPURIOUS, "attribute": "Blond_Hair"}, "are both 'Blond_Hair'"),
        ({**SPURIOUS, "attribute": "Smiling"}, "'Smiling' is drawn per image"),
        ({**SPURIOUS, "target": "Male", "attribute": "Blond_Hair"}, "is drawn before"),
        ({**SPURIOUS, "train_rate": 0.5}, "must be below eval_rate"),
        ({**SPURIOUS, "eval_rate": 1.0}, "less than 1"),
        ({"target": "Blond_Hair"}, "attribute"),
        ({**SPURIOUS, "rate": 0.1}, "Extra inputs are not permitted"),
        (
            {**SPURIOUS, "attribute_hair": "short"},
            r"attribute_hair must be one of \['as_drawn', 'buzz_cut'\], got 'short'",
        ),
        (
            {"target": "Young", "attribute": "Male", "attribute_hair": "buzz_cut"},
            r"spurious.target with attribute_hair 'buzz_cut' must be one of \['Blond_Hair', "
            r"'Black_Hair', 'Brown_Hair', 'Gray_Hair'\], got 'Young'",
        ),
    ],
)
def test_bad_spurious_settings_are_named(spurious, needle):
    with pytest.raises(ValidationError, match=needle):
        WorldConfig(spurious=spurious)


def test_configs_spurious_yaml_is_a_blond_hair_task_on_a_spurious_world(tmp_path):
    path = Path(__file__).resolve().parents[1] / "configs" / "spurious.yaml"
    config = load_config(path)
    assert config.world.spurious is not None
    assert (config.world.spurious.target, config.world.spurious.attribute) == ("Blond_Hair", "Male")
    assert (config.task.kind, config.task.target) == ("attribute", "Blond_Hair")
    assert config.world.spurious.attribute_hair == "buzz_cut"  # the classic failure needs it
    assert config.report.group_by == ["Male"]  # the benchmark's groups: Blond_Hair x Male
    assert config.world.hard_attributes == {}
    home = config.model_copy(update={"home": str(tmp_path / "home")})
    assert preflight(home, str(path)) is home
