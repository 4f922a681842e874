"""Which Docker subnets get routed, and why the others do not (pure)."""

from __future__ import annotations

from ipaddress import IPv4Network

import pytest
from ctun.core.docker_policy import DockerConfig, NetworkInfo, Selector, plan


def test_policy_plan_is_pure_and_explains_itself() -> None:
    def net(name: str, subnet: str, internal: bool = False, **labels: str) -> NetworkInfo:
        return NetworkInfo(name, name, "bridge", internal, labels,
                           (IPv4Network(subnet),) if ":" not in subnet else ())

    networks = [net("a", "10.1.0.0/24"), net("b", "10.2.0.0/24", tier="db"),
                net("c", "10.3.0.0/24", internal=True), net("d", "10.1.0.0/25")]
    cfg = DockerConfig(exclude=(Selector.parse("label:tier=db"),))
    result = plan(networks, cfg, [IPv4Network("10.9.0.0/16")], IPv4Network("192.168.251.0/24"),
                  lambda n: "10.1.0.0/16 dev eth0" if n == IPv4Network("10.9.0.0/16") else None)
    states = {(d.subnet, d.source): d.state for d in result.decisions}
    assert states == {
        ("10.9.0.0/16", "config"): "conflict",
        ("10.1.0.0/24", "docker:a"): "active",
        ("10.2.0.0/24", "docker:b"): "excluded",
        ("10.3.0.0/24", "docker:c"): "internal",
        ("10.1.0.0/25", "docker:d"): "duplicate",
    }
    assert result.routes == (IPv4Network("10.1.0.0/24"),)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("kafka", "must be"), ("name:", "must be"), ("colour:red", "unknown selector kind"),
     ("subnet:10.0.0.0/33", "not a network")],
)
def test_bad_selectors_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Selector.parse(text)


def test_network_info_from_the_engine_json_skips_what_it_cannot_read() -> None:
    info = NetworkInfo.from_api({
        "Id": "abc", "Name": "n", "Driver": "bridge", "Internal": False, "Labels": None,
        "IPAM": {"Config": [{"Subnet": "10.5.0.0/16"}, {"Subnet": "fd00::/64"}, {}]},
    })
    assert [str(s) for s in info.subnets] == ["10.5.0.0/16", "fd00::/64"]
    assert info.labels == {}


def test_the_docker_table_and_its_flags(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from ctun.core.config import ConfigError, load_host_config

    assert isinstance(tmp_path, Path)
    monkeypatch.setenv("CTUN_STATE_DIR", str(tmp_path / "state"))
    config = tmp_path / "ctun.toml"
    config.write_text('[docker]\ninclude = ["name:kafka-*"]\nexclude = ["label:skip"]\n'
                      'internal = true\nagent_host = "10.0.0.1"\n')
    cfg = load_host_config(str(config), {"docker_agent": False})
    assert cfg.docker.include == (Selector.parse("name:kafka-*"),)
    assert cfg.docker.exclude == (Selector("label", "skip"),)
    assert cfg.docker.internal and not cfg.docker.agent and cfg.docker.enabled
    assert cfg.docker.agent_host == "10.0.0.1"
    assert not load_host_config(str(config), {"docker_enabled": False}).docker.enabled
    for text, problem in (('[docker]\nagnet = true\n', "unknown key 'agnet'"),
                          ('[docker]\ninclude = ["kafka"]\n', r"docker\.include\[0\]"),
                          ('[docker]\ninternal = "yes"\n', "must be true or false"),
                          ("docker = 1\n", "must be a table")):
        config.write_text(text)
        with pytest.raises(ConfigError, match=problem) as exc:
            load_host_config(str(config), {})
        assert "\n" not in str(exc.value)
