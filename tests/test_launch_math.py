import pytest
import triton

from fused_resnet.ops.launch_math import cdiv, next_power_of_2


@pytest.mark.parametrize("n", [*range(0, 70), 127, 128, 129, 2**20 - 1, 2**20, 2**31 + 5])
def test_same_as_tritons_own(n):
    assert next_power_of_2(n) == triton.next_power_of_2(n)
    for d in (1, 2, 3, 16, 64, 128):
        assert cdiv(n, d) == triton.cdiv(n, d)
