"""Data location, story splitting, token windows and the reference perplexities."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pl_actsparse.demos import paths as data_mod
from pl_actsparse.demos.tinystories import DATA_ENV_VAR, TokenWindows, load_stories, load_text, resolve_data_dir
from pl_actsparse.tuning.objectives import mean_nll, perplexity
from pl_actsparse.demos.llama2c import Llama2cTokenizer, load_llama2c_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny model: threads only add OpenMP spin-wait overhead on a shared 2-core box
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        return resolve_data_dir()
    except FileNotFoundError as exc:  # pragma: no cover
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def model(data_dir):
    return load_llama2c_checkpoint(data_dir / "stories260K.bin")


@pytest.fixture(scope="module")
def tok(data_dir):
    return Llama2cTokenizer.from_file(data_dir / "tok512.bin")


@pytest.fixture(scope="module")
def stories150(data_dir):
    return load_stories(data_dir, stop=150)


# ----------------------------------------------------------------------------- resolve_data_dir


def _make_data(root: Path) -> Path:
    d = root / "shared" / "data"
    d.mkdir(parents=True)
    return d


def test_explicit_path_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, "/nonexistent/elsewhere")
    assert resolve_data_dir(tmp_path) == tmp_path.resolve()
    assert resolve_data_dir(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="missing_dir.*explicit path"):
        resolve_data_dir(tmp_path / "missing_dir")


def test_env_var_then_the_repository_of_the_current_directory(tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    monkeypatch.setenv(DATA_ENV_VAR, str(env_dir))
    assert resolve_data_dir() == env_dir.resolve()

    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match=r"typo \(\$PL_ACTSPARSE_DATA\)"):
        resolve_data_dir()  # a wrong explicit setting is not silently replaced

    monkeypatch.delenv(DATA_ENV_VAR)
    repo_data = _make_data(tmp_path / "b")
    (tmp_path / "b" / "repo" / "src").mkdir(parents=True)
    (tmp_path / "b" / "repo" / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path / "b" / "repo" / "src")  # anywhere inside the repository
    assert resolve_data_dir() == repo_data.resolve()


def test_error_names_the_place_looked_at(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    (tmp_path / "x" / "cwd").mkdir(parents=True)
    (tmp_path / "x" / "cwd" / ".git").mkdir()
    monkeypatch.chdir(tmp_path / "x" / "cwd")
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_dir()
    msg = str(info.value)
    assert str(tmp_path / "x" / "cwd" / ".." / "shared" / "data") in msg and DATA_ENV_VAR in msg


def test_default_resolves_to_shipped_files(data_dir):
    for name in ("stories260K.bin", "tok512.bin", "tinystories_valid_1000.txt", "tinyshakespeare.txt"):
        assert (data_dir / name).is_file()


# ----------------------------------------------------------------------------- stories and text


def test_load_stories_splits_on_markers_only(data_dir):
    stories = load_stories(data_dir)
    assert len(stories) == 1000
    assert stories[0].startswith("Spot. Spot saw the shiny car")
    assert not any("<|endoftext|>" in s for s in stories)
    assert all(s == s.strip() and s for s in stories)
    assert sum("\n\n" in s for s in stories) > 900  # paragraphs stay inside their story
    assert sum(map(len, stories)) / 1000 == pytest.approx(790, rel=0.05)
    assert load_stories(data_dir / "tinystories_valid_1000.txt", 10, 13) == stories[10:13]
    assert load_stories(data_dir, start=998) == stories[998:]
    assert load_stories(data_dir, 5, 5) == []


@pytest.mark.parametrize(
    "start, stop, pattern",
    [(-1, None, "start=-1 is out of range"), (1001, None, "start=1001"), (0, 1001, "stop=1001"),
     (10, 5, "stop=5 is out of range: need start=10 <= stop <= 1000")],
)
def test_load_stories_bounds(data_dir, start, stop, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_stories(data_dir, start, stop)


def test_load_text(data_dir):
    text = load_text("tinyshakespeare", data_dir)
    assert text.startswith("First Citizen:")
    assert len(text.encode("utf-8")) == 1_115_394
    assert load_text("tinyshakespeare.txt", data_dir, max_chars=100) == text[:100]
    with pytest.raises(FileNotFoundError, match="tinyshakespeare.txt"):
        load_text("nope", data_dir)
    with pytest.raises(ValueError, match="inside the data directory"):
        load_text("../data/tinyshakespeare.txt", data_dir)


def test_all_stories_tokenize_fast_to_the_published_total(data_dir):
    stories = load_stories(data_dir)
    fresh = Llama2cTokenizer.from_file(data_dir / "tok512.bin")  # empty chunk cache
    t0 = time.perf_counter()
    total = sum(len(fresh.encode(s)) for s in stories)
    elapsed = time.perf_counter() - t0
    assert total == 390_336  # SOURCES.md: all 1000 stories, BOS included
    assert elapsed < 10.0, f"tokenizing 1000 stories took {elapsed:.1f}s"


# ----------------------------------------------------------------------------- windows


def test_windows_disjoint(stories150, tok):
    ds = TokenWindows(stories150, tok, 256)
    assert len(ds.tokens) == 50_073
    assert int((ds.tokens == tok.bos_id).sum()) == 150  # one BOS per story, no EOS
    assert len(ds) == 194 == 50_073 // 257
    assert ds.num_predicted == 194 * 256
    x, y = ds.pair(3)
    assert torch.equal(ds[3], x) and x.dtype == torch.long and x.shape == (256,)
    assert torch.equal(x[1:], y[:-1])
    whole = torch.cat([torch.cat([ds.pair(i)[0], ds.pair(i)[1][-1:]]) for i in range(len(ds))])
    assert torch.equal(whole, ds.tokens[: 194 * 257])  # non-overlapping (seq_len + 1)-token pieces
    assert torch.equal(ds[-1], ds[193])
    with pytest.raises(IndexError):
        ds[194]


def test_windows_contiguous(stories150, tok):
    ds = TokenWindows(stories150, tok, 512, mode="contiguous")
    assert len(ds) == 98
    assert ds.num_predicted == 50_072 == len(ds.tokens) - 1  # every token but the first, once
    assert ds[97].shape == (50_072 - 97 * 512,)
    inputs = torch.cat([ds[i] for i in range(len(ds))])
    assert torch.equal(inputs, ds.tokens[:-1])
    targets = torch.cat([ds.pair(i)[1] for i in range(len(ds))])
    assert torch.equal(targets, ds.tokens[1:])
    assert len(TokenWindows(stories150, tok, 512, max_windows=5)) == 5


def test_windows_argument_errors(tok):
    with pytest.raises(TypeError, match="sequence of strings"):
        TokenWindows("a story", tok, 8)
    with pytest.raises(ValueError, match="mode must be"):
        TokenWindows(["a"], tok, 8, mode="overlap")
    with pytest.raises(ValueError, match="seq_len must be"):
        TokenWindows(["a"], tok, 0)


# ----------------------------------------------------------------------------- perplexity


def test_reference_perplexity_256_disjoint(model, tok, stories150):
    ds = TokenWindows(stories150, tok, 256)
    assert len(ds) == 194
    assert perplexity(model, ds) == pytest.approx(3.758, abs=0.002)


def test_reference_perplexity_512_contiguous(model, tok, stories150):
    nll, n = mean_nll(model, TokenWindows(stories150, tok, 512, mode="contiguous"))
    assert n == 50_072
    assert nll == pytest.approx(1.2988, abs=5e-4)  # SOURCES.md
    assert math.exp(nll) == pytest.approx(3.665, abs=0.002)


def test_512_disjoint_differs_from_sources_convention(model, tok, stories150):
    # documents why two window modes exist: the disjoint cut at 512 gives 3.653, not 3.665
    ds = TokenWindows(stories150, tok, 512)
    assert (len(ds), ds.num_predicted) == (97, 49_664)
    assert perplexity(model, ds) == pytest.approx(3.653, abs=0.002)


def test_shakespeare_is_out_of_domain(model, tok, data_dir):
    text = load_text("tinyshakespeare", data_dir, max_chars=20_000)
    ds = TokenWindows([text], tok, 512, mode="contiguous", max_windows=4)
    assert ds.num_predicted == 2048
    assert perplexity(model, ds) == pytest.approx(58.5, abs=0.1)  # SOURCES.md control


def test_perplexity_input_forms_agree(model, tok, stories150):
    ds = TokenWindows(stories150[:10], tok, 64)
    ref = perplexity(model, ds)
    whole = torch.stack([torch.cat([x, y[-1:]]) for x, y in ds.pairs()])
    assert perplexity(model, whole, batch_size=3) == pytest.approx(ref, rel=1e-6)
    assert perplexity(model, ds.pairs(), batch_size=1) == pytest.approx(ref, rel=1e-6)
    with pytest.raises(ValueError, match=r"\[N, L\+1\]"):
        perplexity(model, whole[0])
    with pytest.raises(TypeError, match="bare windows"):
        perplexity(model, torch.utils.data.Subset(ds, [0, 1]))  # inputs only, no targets


class _Recorder(nn.Module):
    """Uniform logits over `vocab`; records grad mode and training flag of each call."""

    def __init__(self, vocab: int, hf_style: bool = False) -> None:
        super().__init__()
        self.vocab = vocab
        self.hf_style = hf_style
        self.p = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, ids):
        self.seen.append((torch.is_grad_enabled(), self.training))
        logits = torch.zeros(*ids.shape, self.vocab) + self.p
        return SimpleNamespace(logits=logits) if self.hf_style else logits


@pytest.mark.parametrize("hf_style", [False, True])
def test_perplexity_mode_grad_and_uniform_value(hf_style):
    windows = torch.randint(0, 37, (5, 9))
    m = _Recorder(37, hf_style).train()
    assert perplexity(m, windows, batch_size=2) == pytest.approx(37.0, rel=1e-6)  # uniform => vocab size
    assert m.seen == [(False, False)] * 3  # 2 + 2 + 1 windows, no grad, eval mode
    assert m.training  # restored
    m.eval()
    perplexity(m, windows)
    assert not m.training


class _WrongShape(nn.Module):
    def forward(self, ids):
        return torch.zeros(ids.shape[0], ids.shape[1] + 1, 10)


def test_perplexity_restores_mode_on_error():
    m = _WrongShape().train()
    with pytest.raises(ValueError, match="do not match targets"):
        perplexity(m, torch.zeros(2, 5, dtype=torch.long))
    assert m.training
    with pytest.raises(ValueError, match="must be equal 1-D"):
        perplexity(m, [(torch.zeros(4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))])
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(m, [])


def test_repository_root_is_found_from_the_current_directory(monkeypatch):
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root / "tests")
    assert data_mod.repository_root() == root and (root / "pyproject.toml").is_file()
