"""The Accelerate launch configs in examples/accelerate load, and their launch lines
name files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))
EXPECTED = {  # name: (distributed type, processes, machines)
    "cpu_2proc.yaml": ("MULTI_GPU", 2, 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, 1),
    "fsdp.yaml": ("FSDP", 8, 1),
    "fsdp2_two_nodes.yaml": ("FSDP", 16, 2),
}


def test_every_config_is_listed():
    assert sorted(p.name for p in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_launch_lines_name_itself(path):
    config = load_config_from_file(str(path))
    kind, processes, machines = EXPECTED[path.name]
    assert str(config.distributed_type).endswith(kind)
    assert (config.num_processes, config.num_machines) == (processes, machines)
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
    lines = re.findall(r"--config_file (\S+)", path.read_text())
    assert lines and all(ROOT / line == path for line in lines)
