"""`adaptloop report`: charts and a page that show exactly what the registry holds."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from adaptloop.cli import cli
from tests.support.adapters import fake_adapter, manifest
from trainer.registry import AdapterRegistry
from trainer.report import PNG_KEY

pytestmark = pytest.mark.unit

VERSIONS = [  # version, loss curve, user score, core score, passed
    (1, [2.5, 1.75, 1.125, 0.5], 0.84, 0.61, True),
    (2, [2.25, 1.5, 0.25], 0.42, 0.33, False),
    (3, [2.0, 0.875, 0.375], 0.93, 0.6, True),
]
# Version 3 also kept the loss's two parts (versions 1 and 2 are from before they were kept).
PARTS = {"user": [2.5, None, 0.5], "anchor_kl": [0.0, 0.21875, 0.0625]}


def _registry(root) -> AdapterRegistry:
    registry = AdapterRegistry(root / "store")
    for version, curve, user, core, passed in VERSIONS:
        registry.register(
            "alice",
            fake_adapter(root, f"a{version}", f"w{version}".encode()),
            manifest(
                trigger="threshold",
                trained_at=f"2026-11-2{version}T10:00:00+00:00",
                loss_curve=curve,
                loss_curves=PARTS if version == 3 else {},
                metrics={
                    "user_score": user,
                    "core_score": core,
                    "final_loss": curve[-1],
                    "steps": len(curve),
                    "train_seconds": 12.5,
                },
                validation={"passed": passed, "reasons": [] if passed else ["core suite regressed <script>alert(1)</script>"]},
            ),
        )
        if passed:
            registry.activate("alice", version, reason="passed the validation gate")
        else:
            registry.mark("alice", version, "rejected", reasons=["core suite regressed <script>alert(1)</script>"])
    return registry


def test_report_writes_loss_curves_scores_and_a_page_with_the_registry_numbers(tmp_path):
    _registry(tmp_path)
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "store"), "promote_if_score": 0.7}))
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["--config", str(config), "report", "alice", "--out", str(out)])
    assert result.exit_code == 0, result.output

    for version, curve, *_scores in VERSIONS:
        png = Image.open(out / f"loss_v{version}.png")
        assert png.format == "PNG" and png.size[0] > 300
        assert json.loads(png.text[PNG_KEY])["loss_curves"] == (PARTS if version == 3 else {"loss": curve})
    scores = json.loads(Image.open(out / "scores.png").text[PNG_KEY])
    assert scores["versions"] == [1, 2, 3]
    assert scores["validation_score"] == [v[2] for v in VERSIONS] and scores["core_score"] == [v[3] for v in VERSIONS]
    assert scores["passed"] == [True, False, True]

    page = (out / "index.html").read_text()
    for _, curve, user, core, _ in VERSIONS:
        assert f"<td>{user:.3f}</td>" in page and f"<td>{core:.3f}</td>" in page and f"<td>{curve[-1]:.3f}</td>" in page
    assert "active: v3" in page and page.count('<tr class="rejected">') == 1
    assert "<script>" not in page and "&lt;script&gt;" in page, "reasons are escaped"
    assert page.count("data:image/png;base64,") == 4, "the charts are embedded: the API serves the same page"
    numbers = json.loads((out / "report.json").read_text())
    assert [r["version"] for r in numbers["versions"]] == [1, 2, 3] and numbers["promote_if_score"] == 0.7


def test_report_of_a_user_without_versions_is_a_clear_error(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"storage_root": str(tmp_path / "store")}))
    result = CliRunner().invoke(cli, ["--config", str(config), "report", "nobody", "--out", str(tmp_path / "r")])
    assert result.exit_code != 0 and "nobody has no adapter versions" in result.output
    assert not (tmp_path / "r").exists()
