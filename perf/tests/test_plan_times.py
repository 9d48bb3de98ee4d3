"""python -m perf.plan_times prints a build time for every variant, ring and meta call."""

from perf import plan_times
from ring_attention import registry
from ring_attention.layout import Layout


def test_the_command_prints_every_line(capsys):
    assert plan_times.main(["--n", "1024", "--heads", "4", "--dim", "8"]) == 0
    out = capsys.readouterr().out
    for v in registry.VARIANTS.values():
        if v.kind is not registry.Kind.DENSE:
            assert f"\n{v.name} " in out
    assert out.count(" all 256 ") == 4 and out.count(" repeated ") == 4 and out.count(" all 8 ") == 2 * len(Layout)
    assert out.count(" max/min ") == len(Layout)
