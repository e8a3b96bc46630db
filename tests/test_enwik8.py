"""enwik8: download (progress, checksum, resume), extraction, the byte split, cache reuse, evaluation with
context, the prepare CLI and training resume. No real download: a small fake enwik8 in the real format (a
zip holding one member `enwik8`) is served from a local HTTP server."""

import hashlib
import http.server
import inspect
import io
import math
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from hier_lm.config import compose_train_config
from hier_lm.data import ChecksumError, DownloadError, Enwik8DataModule, download
from hier_lm.data.__main__ import main as data_cli
from hier_lm.data.download import Progress
from hier_lm.tasks import LanguageModelTask
from hier_lm.tasks.language_model import scored_next_token_loss
from tests.helpers import subprocess_env
from tests.test_textfiles import files_state, fit_recording

SIZES = [6000, 500, 500]  # train, valid, test bytes of the fake enwik8
SEQ_LEN, BATCH = 16, 4
UNREACHABLE = "http://127.0.0.1:9/enwik8.zip"  # the discard port: connection refused


def fake_enwik8(sizes=SIZES, seed=0) -> bytes:
    """Bytes of every value 0..255 (so windows are locatable), XML-looking enough to compress a little."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, sum(sizes), dtype=np.uint8).tobytes()


def make_zip(data: bytes, member: str = "enwik8") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, data)
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


DATA = fake_enwik8()
ZIP = make_zip(DATA)


class Server:
    """A local HTTP server of in-memory files that logs every request and can ignore Range headers or
    close the connection after `cut_after` body bytes (once)."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True):
        self.files, self.ranges, self.cut_after = files, ranges, None
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.sent: list[int] = []  # body bytes sent per request
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                # Everything is logged before the response is written: the client may go on right after it.
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    server.sent.append(0)
                    self.send_error(404)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and server.ranges:
                    start = int(match.group(1))
                    if start >= len(data):
                        server.sent.append(0)
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                if server.cut_after is not None:
                    body, server.cut_after = body[: server.cut_after], None
                server.sent.append(len(body))
                if match and server.ranges:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server({"/enwik8.zip": ZIP})
    yield s
    s.close()


def enwik8(root: Path, setup: bool = True, **kwargs) -> Enwik8DataModule:
    options = {"root": root, "url": UNREACHABLE, "sha256": sha(ZIP), "raw_sha256": sha(DATA), "split_sizes": SIZES,
               "seq_len": SEQ_LEN, "batch_size": BATCH, **kwargs}
    dm = Enwik8DataModule(**options)
    if setup:
        dm.prepare_data()
        dm.setup("fit")
    return dm


# --------------------------------------------------------------------------------------- download + cache


def test_download_verify_extract_split_and_reuse(server, tmp_path):
    dm = enwik8(tmp_path, url=f"{server.url}/enwik8.zip")
    folder = tmp_path / "enwik8"
    assert dm.corpus.path == folder and dm.vocab_size == 256 and dm.metric == "bpc"
    assert sorted(p.name for p in folder.iterdir()) == ["corpus.bin", "enwik8.zip", "meta.json"]
    assert (folder / "enwik8.zip").read_bytes() == ZIP and (folder / "corpus.bin").read_bytes() == DATA
    # 6000 / 500 / 500 bytes, in order, nothing dropped.
    assert dm.corpus.meta["splits"] == {"train": [0, 6000], "valid": [6000, 6500], "test": [6500, 7000]}
    assert bytes(dm.corpus.split("train")) == DATA[:6000]
    assert bytes(dm.corpus.split("valid")) == DATA[6000:6500]
    assert bytes(dm.corpus.split("test")) == DATA[6500:]
    assert dm.corpus.meta["sha256"] == sha(DATA) and dm.corpus.meta["source_sha256"] == sha(ZIP)
    counts = np.bincount(np.frombuffer(DATA[6000:6500], dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / 500
    assert dm.corpus.unigram_entropy("valid") == pytest.approx(float(-(p * np.log2(p)).sum()), rel=1e-12)
    assert server.requests == [("/enwik8.zip", None)]

    # A second run (a new module, as in a new process) reuses the cache: no request, no rewrite.
    state = files_state(folder)
    again = enwik8(tmp_path, url=f"{server.url}/enwik8.zip")
    assert len(server.requests) == 1 and files_state(folder) == state
    assert bytes(again.corpus.split("test")) == DATA[6500:]
    # Other split sizes make a new cache from the kept zip, still without the network.
    other = enwik8(tmp_path, split_sizes=[5000, 1000, 1000])
    assert bytes(other.corpus.split("valid")) == DATA[5000:6000] and len(server.requests) == 1


def test_progress_is_plain_lines_off_a_terminal(server, tmp_path, capsys):
    big = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # 3 MiB: 3 chunks
    server.files["/big.bin"] = big
    download(f"{server.url}/big.bin", tmp_path / "big.bin", sha(big), desc="big.bin")
    captured = capsys.readouterr()
    assert captured.out == "" and "\r" not in captured.err
    lines = captured.err.splitlines()
    assert lines[0] == "big.bin: downloading 3.1 MB" and lines[-1] == "big.bin: 3.1 MB (100%)"
    assert len(lines) == 4 and all(line.startswith("big.bin: ") for line in lines)  # 33%, 66%, 100%

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    bar = Progress("x", total=1000, stream=terminal)
    bar.update(1000)
    bar.close()
    assert "\r" in terminal.getvalue() and "100%" in terminal.getvalue()  # a tqdm bar on a terminal


def test_checksum_mismatch_leaves_nothing_and_keeps_good_files(server, tmp_path):
    dest = tmp_path / "dl" / "enwik8.zip"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        download(f"{server.url}/enwik8.zip", dest, wrong, progress=False)
    message = str(err.value)
    assert f"{server.url}/enwik8.zip" in message and wrong in message and sha(ZIP) in message
    assert "data.sha256=null (for training or `python -m hier_lm.data prepare`)" in message
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no final file, no .part

    # A good file already at the final path is never replaced, even when another checksum is asked for.
    dest.write_bytes(ZIP)
    with pytest.raises(ChecksumError, match=r"exists but its sha256 is .*delete it"):
        download(f"{server.url}/enwik8.zip", dest, wrong, progress=False)
    assert dest.read_bytes() == ZIP and len(server.requests) == 1
    assert download(f"{server.url}/enwik8.zip", dest, sha(ZIP)) == dest and len(server.requests) == 1

    # A good cache survives a rebuild whose bytes fail verification (other split sizes force the rebuild).
    enwik8(tmp_path / "root", path=tmp_path / "dl" / "enwik8.zip")
    folder = tmp_path / "root" / "enwik8"
    state = files_state(folder)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(make_zip(fake_enwik8(seed=1)))
    with pytest.raises(ChecksumError, match=r"sha256 .*expected " + sha(DATA)):
        enwik8(tmp_path / "root", path=bad, sha256=None, split_sizes=[5000, 1000, 1000])
    assert files_state(folder) == state


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "range-ignored"])
def test_interrupted_download_resumes_from_the_part_file(tmp_path, ranges):
    server = Server({"/enwik8.zip": ZIP}, ranges=ranges)
    try:
        server.cut_after = 1000
        url = f"{server.url}/enwik8.zip"
        with pytest.raises(DownloadError, match=r"closed .* before the end.*run again to resume") as err:
            enwik8(tmp_path, url=url)
        assert isinstance(err.value, FileNotFoundError) and "data.path=" in str(err.value)
        part = tmp_path / "enwik8" / "enwik8.zip.part"
        assert part.read_bytes() == ZIP[:1000]
        assert not (tmp_path / "enwik8" / "enwik8.zip").exists() and not (tmp_path / "enwik8" / "meta.json").exists()

        dm = enwik8(tmp_path, url=url)
        assert server.requests == [("/enwik8.zip", None), ("/enwik8.zip", "bytes=1000-")]
        # With Range support only the rest is sent; a server that ignores it sends all and we start over.
        assert server.sent == [1000, len(ZIP) - 1000 if ranges else len(ZIP)]
        assert (tmp_path / "enwik8" / "enwik8.zip").read_bytes() == ZIP and not part.exists()
        assert (tmp_path / "enwik8" / "corpus.bin").read_bytes() == DATA
        assert bytes(dm.corpus.split("valid")) == DATA[6000:6500]
    finally:
        server.close()


def test_complete_or_stale_part_files(server, tmp_path):
    url, dest = f"{server.url}/enwik8.zip", tmp_path / "enwik8.zip"
    part = tmp_path / "enwik8.zip.part"
    part.write_bytes(ZIP)  # killed after the transfer, before the rename: 416, verified, renamed
    assert download(url, dest, sha(ZIP), progress=False) == dest and dest.read_bytes() == ZIP
    assert server.sent == [0] and not part.exists()

    dest.unlink()
    part.write_bytes(make_zip(fake_enwik8(seed=2))[:500])  # a stale start of another file: resumed, rejected,
    assert download(url, dest, sha(ZIP), progress=False) == dest  # then downloaded afresh
    assert server.requests[1:] == [("/enwik8.zip", "bytes=500-"), ("/enwik8.zip", None)]
    assert dest.read_bytes() == ZIP and not part.exists()

    with pytest.raises(DownloadError, match=r"HTTP 404.*put it at") as err:
        download(f"{server.url}/missing.zip", tmp_path / "missing.zip", progress=False)
    assert f"{server.url}/missing.zip" in str(err.value) and not (tmp_path / "missing.zip").exists()


def test_local_zip_or_raw_file_without_network(tmp_path):
    raw, archive = tmp_path / "enwik8", tmp_path / "enwik8.zip"
    raw.write_bytes(DATA)
    archive.write_bytes(ZIP)
    for name, source in (("from-zip", archive), ("from-raw", raw)):
        dm = enwik8(tmp_path / name, path=source)  # url is unreachable: any network use would fail
        assert (tmp_path / name / "enwik8" / "corpus.bin").read_bytes() == DATA
        assert bytes(dm.corpus.split("train")) == DATA[:6000]
        assert sorted(p.name for p in (tmp_path / name / "enwik8").iterdir()) == ["corpus.bin", "meta.json"]
    # A zip placed in the cache folder by hand is used as if downloaded.
    (tmp_path / "placed" / "enwik8").mkdir(parents=True)
    (tmp_path / "placed" / "enwik8" / "enwik8.zip").write_bytes(ZIP)
    assert bytes(enwik8(tmp_path / "placed").corpus.split("test")) == DATA[6500:]

    with pytest.raises(DownloadError, match=r"could not download .*Connection refused.*data\.path="):
        enwik8(tmp_path / "offline")
    with pytest.raises(FileNotFoundError, match=r"data\.path=.*nowhere is not a file"):
        enwik8(tmp_path / "r", path=tmp_path / "nowhere")
    short = tmp_path / "short"
    short.write_bytes(DATA[:-1])
    with pytest.raises(ValueError, match=r"has 6,999 bytes and is not a zip, but the extracted enwik8 has 7,000"):
        enwik8(tmp_path / "r", path=short)
    (tmp_path / "short.zip").write_bytes(make_zip(DATA[:-1]))
    with pytest.raises(ValueError, match=r"member 'enwik8' has 6,999 bytes, but enwik8 has 7,000"):
        enwik8(tmp_path / "r", path=tmp_path / "short.zip", sha256=None)
    (tmp_path / "other.zip").write_bytes(make_zip(DATA, member="text8"))
    with pytest.raises(ValueError, match=r"has no member 'enwik8' \(it holds \['text8'\]\)"):
        enwik8(tmp_path / "r", path=tmp_path / "other.zip", sha256=None)
    with pytest.raises(ChecksumError, match=r"data\.path=.*enwik8\.zip has sha256 .*data\.sha256=null"):
        enwik8(tmp_path / "r", path=archive, sha256="1" * 64)
    damaged = bytearray(ZIP)
    damaged[len(ZIP) // 2] ^= 0xFF  # inside the deflated data
    (tmp_path / "damaged.zip").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"damaged.zip is damaged"):
        enwik8(tmp_path / "r", path=tmp_path / "damaged.zip", sha256=None)
    assert list((tmp_path / "r").iterdir()) == []  # no cache, no writer's temporary folder left


# ------------------------------------------------------------------------------------ evaluation windows


def tiny_model() -> torch.nn.Module:
    from hier_lm.models import build_model

    torch.manual_seed(0)
    return build_model({"name": "transformer", "vocab_size": 256, "d_model": 16, "n_layers": 1, "n_heads": 2,
                        "d_ff": 32, "max_len": SEQ_LEN, "dropout": 0.0}).eval()


@pytest.mark.parametrize("context", [5, SEQ_LEN - 1])
def test_eval_context_scores_every_byte_once(tmp_path, context):
    dm = enwik8(tmp_path, path=_raw(tmp_path), eval_context=context, eval_batch_size=3)
    split = bytes(dm.corpus.split("valid"))
    batches = list(dm.val_dataloader())
    scored, n_windows = [], 0
    for tokens, n_context in batches:
        assert tokens.dtype == torch.long and tokens.shape[1] == SEQ_LEN + 1 and n_context.shape == (len(tokens),)
        for row, n in zip(tokens, n_context.tolist()):
            window = bytes(row.to(torch.uint8).tolist())
            start = split.find(window)
            assert start >= 0 and split.find(window, start + 1) == -1  # a contiguous piece of the split
            # Window 0 scores all its targets; every other has at least `context` unscored targets first.
            assert n == 0 if n_windows == 0 else n >= context
            scored.append((start + 1 + n, window[1 + n:]))
            n_windows += 1
    # The scored targets are split bytes 1..499, each once, in order: 499 = split size - 1.
    assert b"".join(piece for _, piece in scored) == split[1:]
    assert [start for start, _ in scored] == list(np.cumsum([1] + [len(p) for _, p in scored[:-1]]))
    assert dm.num_eval_tokens("valid") == dm.num_eval_tokens("test") == 499
    assert n_windows == 1 + math.ceil((499 - SEQ_LEN) / (SEQ_LEN - context))

    # The loss over scored targets equals a brute force: each target predicted from its whole window prefix.
    model = tiny_model()
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, n_context in batches:
            loss, n = scored_next_token_loss(model, (tokens, n_context))
            total, count = total + loss.item() * n, count + n
        brute = []
        for tokens, n_context in batches[:3]:
            for row, n in zip(tokens, n_context.tolist()):
                for j in range(n, SEQ_LEN):
                    logits = model(row[None, : j + 1])[0, -1]
                    brute.append(F.cross_entropy(logits[None], row[j + 1: j + 2]).item())
        first = sum(SEQ_LEN - n for _, nc in batches[:3] for n in nc.tolist())
        loss3 = sum(scored_next_token_loss(model, b)[0].item() * scored_next_token_loss(model, b)[1]
                    for b in batches[:3])
    assert count == 499 and len(brute) == first
    assert loss3 / first == pytest.approx(sum(brute) / len(brute), rel=1e-5)

    # Through the Lightning task: val/loss is the mean over exactly those 499 scored bytes.
    task = LanguageModelTask(model={"name": "transformer", "vocab_size": 256, "d_model": 16, "n_layers": 1,
                                    "n_heads": 2, "d_ff": 32, "max_len": SEQ_LEN, "dropout": 0.0}, optim={})
    task.model.load_state_dict(model.state_dict())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path / "run")
    logged = trainer.validate(task, datamodule=dm, verbose=False)[0]
    assert logged["val/loss"] == pytest.approx(total / count, rel=1e-5)
    assert logged["val/bpc"] == pytest.approx(total / count / math.log(2), rel=1e-5)


def _raw(tmp_path: Path) -> Path:
    raw = tmp_path / "enwik8-raw"
    if not raw.exists():
        raw.write_bytes(DATA)
    return raw


def test_eval_without_context_is_unchanged(tmp_path):
    dm = enwik8(tmp_path, path=_raw(tmp_path), eval_batch_size=5)
    batches = list(dm.test_dataloader())
    windows = torch.cat(batches)  # plain LongTensor batches, as for textfiles
    assert windows.shape == (499 // SEQ_LEN, SEQ_LEN + 1) and dm.num_eval_tokens("test") == 31 * SEQ_LEN
    assert bytes(windows[:, :-1].flatten().to(torch.uint8).tolist()) == DATA[6500:6500 + 31 * SEQ_LEN]
    model = tiny_model()
    with torch.no_grad():
        loss, n = scored_next_token_loss(model, batches[0])
        logits = model(batches[0][:, :-1])
    assert n == 5 * SEQ_LEN
    assert loss.item() == F.cross_entropy(logits.flatten(0, 1), batches[0][:, 1:].flatten()).item()
    with pytest.raises(ValueError, match=r"data\.eval_context must be smaller than data\.seq_len = 16"):
        enwik8(tmp_path, setup=False, eval_context=SEQ_LEN)
    with pytest.raises(ValueError, match=r"data\.split_sizes must be three positive byte counts"):
        enwik8(tmp_path, setup=False, split_sizes=[10, 0, 5])
    with pytest.raises(ValueError, match=r"valid split has 500 bytes, fewer than data\.seq_len \+ 1 = 501"):
        enwik8(tmp_path, path=_raw(tmp_path), seq_len=500).val_dataloader()


# ------------------------------------------------------------------------------- CLI, config, resume


@pytest.mark.slow
def test_prepare_cli(server, tmp_path, capsys):
    args = ["prepare", "enwik8", f"data.root={tmp_path}", f"data.url={server.url}/enwik8.zip",
            f"data.sha256={sha(ZIP)}", f"raw_sha256={sha(DATA)}",  # the data. prefix is optional
            f"split_sizes=[{','.join(map(str, SIZES))}]"]
    result = subprocess.run([sys.executable, "-m", "hier_lm.data", *args], capture_output=True, text=True,
                            env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == f"enwik8 cache: {tmp_path / 'enwik8'}"
    assert out[1] == f"  corpus.bin: 7,000 bytes, sha256 {sha(DATA)}"
    assert [line.split()[:3] for line in out[2:]] == [["train", "6,000", "bytes"], ["valid", "500", "bytes"],
                                                      ["test", "500", "bytes"]]
    assert all("unigram entropy" in line for line in out[2:]) and len(out) == 5
    assert "\r" not in result.stderr and "enwik8.zip: downloading" in result.stderr
    assert len(server.requests) == 1

    data_cli(args)  # again, in this process: the cache is reused
    assert capsys.readouterr().out.splitlines() == out and len(server.requests) == 1
    # The deprecated flags of the former command line say the same.
    data_cli(["prepare", "enwik8", "--root", str(tmp_path), "--url", f"{server.url}/enwik8.zip", "--sha256", sha(ZIP),
              "--raw-sha256", sha(DATA), "--split-sizes", *map(str, SIZES)])
    captured = capsys.readouterr()
    assert captured.out.splitlines() == out and len(server.requests) == 1
    assert captured.err == (f"note: --flags are deprecated; write the keys as in training: data.root='{tmp_path}' "
                            f"data.url='{server.url}/enwik8.zip' data.sha256='{sha(ZIP)}' "
                            f"data.raw_sha256='{sha(DATA)}' data.split_sizes=[{','.join(map(str, SIZES))}]\n")

    for bad, message in ((["enwik9"], "error: unknown dataset 'enwik9': choose one of enwik8, imagenet32, imagenet64, "
                                      "lm1b, lra_image, lra_listops, lra_pathfinder, lra_retrieval, lra_text, "
                                      "synthetic_images, textfiles"),
                         (["enwik8", "data.size=3"], "error: data=enwik8 has no setting data.size: its settings are "
                                                     "root, url, sha256, raw_sha256, path, split_sizes, seq_len"),
                         (["enwik8", "seq_len=0"], "error: data.seq_len must be at least 1, got 0"),
                         (["enwik8", "split_sizes=[1,2"], "error: "),
                         (["enwik8", f"root={tmp_path / 'r'}", f"path={tmp_path / 'nowhere'}"], "error: data.path="),
                         (["enwik8", "--path"], "error: --path needs a value: write data.path=VALUE")):
        with pytest.raises(SystemExit) as exit_info:
            data_cli(["prepare", *bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_config_group_instantiates_the_module(tmp_path, monkeypatch):
    monkeypatch.setenv("HIER_LM_DATA", str(tmp_path))
    cfg = compose_train_config(["data=enwik8", "seed=3"])
    expected = {name for name in inspect.signature(Enwik8DataModule).parameters}
    assert set(cfg.data) - {"_target_"} == expected  # every argument is in the YAML
    dm = instantiate(cfg.data)
    assert isinstance(dm, Enwik8DataModule)
    assert dm.hparams.root == str(tmp_path) and dm.hparams.seed == 3 and dm.hparams.seq_len == 2048
    assert dm.hparams.split_sizes == [90_000_000, 5_000_000, 5_000_000] and type(dm.hparams.split_sizes) is list
    assert dm.hparams.url == "http://mattmahoney.net/dc/enwik8.zip"
    assert dm.hparams.sha256 == "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
    torch.save(dict(dm.hparams), tmp_path / "hparams.pt")  # plain values: loadable with weights_only
    assert torch.load(tmp_path / "hparams.pt", weights_only=True) == dict(dm.hparams)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_training_resume_continues_the_batch_sequence(tmp_path):
    raw = _raw(tmp_path)

    def fit(max_steps, ckpt_path=None):
        return fit_recording(enwik8(tmp_path, path=raw, seed=9), max_steps, tmp_path / "run", ckpt_path)

    trainer, uninterrupted = fit(3)
    train = DATA[:6000]
    assert all(train.find(bytes(row.to(torch.uint8).tolist())) >= 0 for batch in uninterrupted for row in batch)
    assert len(uninterrupted) == 6 and trainer.datamodule.state_dict() == {"train_batches": 6, "seed": 9}
    trainer, _ = fit(1)
    trainer.save_checkpoint(tmp_path / "step1.ckpt")
    assert torch.load(tmp_path / "step1.ckpt", weights_only=True)["Enwik8DataModule"] == {
        "train_batches": 2, "seed": 9}
    _, resumed = fit(3, ckpt_path=tmp_path / "step1.ckpt")
    assert len(resumed) == 4 and all(torch.equal(x, y) for x, y in zip(resumed, uninterrupted[2:]))
