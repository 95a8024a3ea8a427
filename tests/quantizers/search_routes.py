"""Test helpers for the nearest-code search: its two modules seen as one, and the route fixture."""
import pytest

from unitok.quantizers import search, search_bf16


class _SearchModules:
    """``unitok.quantizers.search`` and ``search_bf16`` as one namespace: a name is read from the first
    that has it and set (monkeypatched) in each that has it, so a patch reaches every caller."""

    __slots__ = ()          # no instance __dict__: monkeypatch saves and restores through getattr/setattr

    def __getattr__(self, name):
        for module in (search, search_bf16):
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        holders = [m for m in (search, search_bf16) if hasattr(m, name)]
        if not holders:
            raise AttributeError(name)
        for module in holders:
            setattr(module, name, value)


quantizer_module = _SearchModules()


@pytest.fixture(params=['native', 'bf16', 'fp32'])
def route(request, monkeypatch):
    """Forces one route of the nearest-code search (the others are turned off) and records each call
    of it: (name, list of token counts searched). 'native' is skipped where the kernel cannot run."""
    name, taken = request.param, []

    def recorded(fn):
        return lambda z, table, *rest: taken.append(z.shape[1]) or fn(z, table, *rest)
    if name == 'native':
        if not quantizer_module._native_search_is_exact(8):
            pytest.skip('the native kernel is unavailable here (no compiler, or neither AVX-512 nor AVX2)')
        applies = quantizer_module._native_route_applies
        monkeypatch.setattr(quantizer_module, '_native_route_applies',
                            lambda z, *rest: applies(z, *rest) and (taken.append(z.shape[1]) or True))
    else:
        monkeypatch.setattr(quantizer_module, '_native_route_applies', lambda *args: False)
    if name == 'bf16':
        # On a CPU without bf16 units the route is not taken (its GEMM would be emulated, slowly); its
        # exactness does not depend on the hardware, so it is checked there too.
        monkeypatch.setattr(quantizer_module, 'bf16_runs_in_hardware', lambda device: True)
        monkeypatch.setattr(quantizer_module, '_nearest_bf16', recorded(quantizer_module._nearest_bf16))
    if name == 'fp32':
        monkeypatch.setattr(quantizer_module, '_bf16_route_applies', lambda *args: False)
        monkeypatch.setattr(quantizer_module, '_nearest_fp32', recorded(quantizer_module._nearest_fp32))
    return name, taken

