"""GPU catalog, custom cards, and the size units they are given in."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

import pytest

from planner.gpus import GPUError, GPUSpec, custom_gpu, gpu_ids, list_gpus, load_gpu, resolve_gpu
from planner.units import GiB, MiB, SizeError, format_gib, parse_size

EXPECTED_IDS = [
    "a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "l40s",
    "rtx-4090", "rtx-3090", "a10g", "t4", "v100-32gb", "mi300x",
]  # fmt: skip

SHARED_REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def test_catalog_has_the_issue_ids():
    assert sorted(gpu_ids()) == sorted(EXPECTED_IDS)
    for gid in EXPECTED_IDS:
        g = load_gpu(gid)
        assert isinstance(g, GPUSpec) and g.id == gid
        assert g.memory_source and g.confidence and g.memory_confidence


def test_catalog_is_package_data_not_shared():
    """The CLI reads the copy inside the package, never ../shared."""
    text = resources.files("planner").joinpath("data/gpus.json").read_text()
    raw = json.loads(text)
    assert {row["id"] for row in raw["gpus"]} == set(EXPECTED_IDS)
    for rule in ("memory_bytes", "how_derived", "cuda_context_bytes", "interconnect"):
        assert raw["about"][rule]
    src = Path(resources.files("planner").joinpath("gpus.py")).read_text()
    assert "gpus.csv" not in src and "../shared" not in src


def test_h200_memory_is_the_measured_total():
    h200 = load_gpu("h200")
    assert h200.memory_bytes == 150_109_880_320
    assert h200.measured is not None
    # the measured figures agree with each other: visible GiB is memory_bytes to two decimals
    assert round(h200.memory_bytes / GiB, 2) == h200.measured.cuda_visible_gib


def test_every_card_follows_the_documented_memory_rule():
    """Marketed size is GiB-sized memory, less 1/16 for ECC on GDDR datacenter cards, less a driver
    reservation between 0 and 1.5 GiB."""
    for g in list_gpus():
        physical = g.memory_marketed_gb * GiB * (15 / 16 if g.memory_ecc_carveout else 1)
        reserved = physical - g.memory_bytes
        assert 0 <= reserved <= 1.5 * GiB, (g.id, reserved / GiB)


def test_cuda_context_default_is_the_h200_measurement():
    h200 = load_gpu("h200")
    m = h200.measured
    measured = (m.cuda_visible_gib - m.cuda_free_at_start_gib) * GiB
    for g in list_gpus():
        assert abs(g.cuda_context_bytes - measured) <= MiB, g.id
    assert abs(custom_gpu("24GiB").cuda_context_bytes - measured) <= MiB


def test_interconnect_per_direction_is_half():
    for g in list_gpus():
        assert g.interconnect_gb_per_s_per_direction == g.interconnect_gb_per_s_both_directions / 2
    assert load_gpu("h100-sxm").interconnect_gb_per_s_per_direction == 450


def test_cards_without_bf16():
    assert load_gpu("t4").bf16_tflops is None and load_gpu("t4").fp16_tflops
    assert load_gpu("v100-32gb").bf16_tflops is None


@pytest.mark.skipif(not (SHARED_REF / "gpus.csv").exists(), reason=f"shared reference table missing: {SHARED_REF / 'gpus.csv'} (present in development checkouts beside ../shared only)")
def test_datasheet_columns_match_the_shared_reference():
    rows = {r["name"]: r for r in csv.DictReader((SHARED_REF / "gpus.csv").open())}
    for g in list_gpus():
        r = rows[g.reference_name]
        assert g.memory_marketed_gb == float(r["memory_gb"])
        assert g.bf16_tflops == (float(r["bf16_dense_tflops"]) if r["bf16_dense_tflops"] else None)
        assert g.fp16_tflops == float(r["fp16_dense_tflops"])
        assert g.mem_bandwidth_gb_per_s == float(r["mem_bandwidth_gb_per_s"])
        assert g.interconnect == r["interconnect"]
        assert g.interconnect_gb_per_s_both_directions == float(r["interconnect_gb_per_s_both_directions"])
        assert g.confidence == r["confidence"]
    ceil = next(csv.DictReader((SHARED_REF / "measured_ceilings.csv").open()))
    m = load_gpu("h200").measured
    assert m.bf16_matmul_tflops == float(ceil["bf16_matmul_tflops"])
    assert m.copy_gb_per_s == float(ceil["copy_gb_per_s"])
    assert m.cuda_free_at_start_gib == float(ceil["cuda_context_free_gib_at_start"])


def test_load_gpu_is_case_insensitive():
    assert load_gpu("H200").id == "h200"
    assert load_gpu(" a100-80GB ").id == "a100-80gb"


@pytest.mark.parametrize(
    "typo, expected",
    [("a100", "a100-80gb"), ("h100", "h100-sxm"), ("rtx4090", "rtx-4090"), ("mi300", "mi300x"), ("l40", "l40s")],
)
def test_unknown_gpu_suggests_close_matches(typo, expected):
    with pytest.raises(GPUError) as e:
        load_gpu(typo)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"gpu: unknown gpu '{typo}'")
    assert "did you mean" in msg and expected in msg


def test_unknown_gpu_without_close_match_lists_the_catalog():
    with pytest.raises(GPUError) as e:
        load_gpu("tpu-v5")
    assert "known:" in str(e.value) and "h200" in str(e.value)


def test_custom_card():
    g = custom_gpu("24GiB")
    assert g.memory_bytes == 24 * GiB and g.custom and g.id == "custom"
    assert custom_gpu("24 GB").memory_bytes == 24 * 10**9
    assert custom_gpu(12345).memory_bytes == 12345


def test_resolve_gpu():
    assert resolve_gpu("h200", None) == load_gpu("h200")
    assert resolve_gpu(None, "40GiB").memory_bytes == 40 * GiB
    both = resolve_gpu("h100-sxm", "40GiB")
    assert both.memory_bytes == 40 * GiB and both.bf16_tflops == load_gpu("h100-sxm").bf16_tflops
    with pytest.raises(GPUError, match=r"^gpu: give --gpu ID or --gpu-memory SIZE$"):
        resolve_gpu(None, None)
    with pytest.raises(GPUError, match="gpu_memory: ambiguous"):
        resolve_gpu(None, "24G")


# ---- units ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("24GiB", 24 * 2**30),
        ("24 GiB", 24 * 2**30),
        ("24gib", 24 * 2**30),
        ("24GB", 24 * 10**9),
        ("24 gb", 24 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("80000MB", 80 * 10**9),
        ("1TiB", 2**40),
        ("150109880320", 150_109_880_320),
        ("4096B", 4096),
        (1024, 1024),
    ],
)
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["24G", "24g", "80M", "1T", "24 XB", "GiB", "", "-1GiB", "0", "0GiB", "abc"])
def test_parse_size_rejects(text):
    with pytest.raises(SizeError) as e:
        parse_size(text)
    assert "\n" not in str(e.value)


def test_ambiguous_unit_explains_both_readings():
    with pytest.raises(SizeError, match=r"24GiB.*24GB"):
        parse_size("24G")


def test_format_gib():
    assert format_gib(79.25 * GiB) == "79.25 GiB"
    assert format_gib(0) == "0.00 GiB"
    assert format_gib(-GiB, signed=True) == "-1.00 GiB"
    assert format_gib(GiB, signed=True) == "+1.00 GiB"
