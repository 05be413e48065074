"""``--fidelity``: the 2012 code release (``code``, the default) against the paper's text
(``text``), in the config, the network, the optimiser and the paper pipeline. The release's
numbers are written out literally here, each with its place in
``computerhistory/AlexNet-Source-Code`` (L = layers/layers-145.cfg, P = layers/layer-params-145.cfg)."""

from __future__ import annotations

import pytest
import torch

import main
from training.config import TrainConfig, may_change

CPU = torch.device("cpu")


def config_of(*flags: str) -> TrainConfig:
    return main.config_from_args(main.get_args_parser().parse_args(list(flags)), CPU)


# ---------------------------------------------------------------------------------------------
# The flag and the config field


def test_fidelity_defaults_to_code_and_is_part_of_the_experiment():
    assert config_of("-pm", "-pt").fidelity == "code"
    assert config_of("-pm", "--fidelity", "text").fidelity == "text"
    assert config_of("-c", "-pt", "--fidelity", "text").fidelity == "text"
    assert "fidelity" not in may_change("resume") | may_change("evaluate")
    assert TrainConfig.check("fidelity")("code") == "code"
    with pytest.raises(ValueError):
        TrainConfig.check("fidelity")("faithful")


def test_a_config_without_fidelity_is_what_it_trained_the_text():
    assert TrainConfig.from_dict({"model": "PaperAlexNet", "version": "0.2.0"}).fidelity == "text"
    assert TrainConfig.from_dict({"model": "PaperAlexNet", "fidelity": "code"}).fidelity == "code"
    with pytest.raises(ValueError, match="fidelity"):
        TrainConfig.from_dict({"fidelity": "both"})


@pytest.mark.parametrize("flags", [["--fidelity", "code"], ["-c", "--fidelity", "text"]])
def test_fidelity_without_the_papers_network_or_setup_is_refused(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        main.main(flags)
    assert stop.value.code == 2
    assert "--fidelity only applies to the paper's network or setup; add -pm or -pt" in capsys.readouterr().err


def test_resume_refuses_another_fidelity():
    checkpoint = {"config": {"model": "PaperAlexNet", "paper_train": True, "setup": "paper"}}  # 0.2: text
    args = main.get_args_parser().parse_args(["-pm", "-pt", "--fidelity", "code"])
    with pytest.raises(main.UserError, match="fidelity"):
        main.config_from_checkpoint(checkpoint, "last.pt", args, main.explicit_flags(["-pm", "-pt", "--fidelity",
                                    "code"]), CPU, main.RESUME_MAY_CHANGE)  # fmt: skip
    args = main.get_args_parser().parse_args(["-pm", "-pt"])
    resumed = main.config_from_checkpoint(checkpoint, "last.pt", args, main.explicit_flags(["-pm", "-pt"]), CPU,
                                          main.RESUME_MAY_CHANGE)  # fmt: skip
    assert resumed.fidelity == "text"
