"""llama.cpp itself as the reference of the GGUF export: its converters and its multimodal library (libmtmd), from
the llama.cpp tree that the llama-cpp-python sdist (the version `make test` installs) vendors.

Nothing of it is committed: `source_tree` takes ``QUICKLORIS_LLAMA_CPP_SRC`` (a llama.cpp tree) if set, else the sdist
unpacked in the cache folder (``QUICKLORIS_CACHE``, default ``~/.cache/quickloris``), fetched once with ``pip download``
(77 MB). `mtmd_library` compiles libmtmd from that tree against the libllama / libggml of the installed
llama-cpp-python (whose wheel `make test` builds without it), once per installation: the library is cached by the
path and size of the libllama it links. A llama-cpp-python built with its multimodal library is used as it is.

`run_steps` runs llama.cpp's converter scripts, as a user runs them, one after the other in one subprocess:

* ``convert_hf_to_gguf.py`` (`hf_step`): text models, and with ``--mmproj`` the vision file of Qwen2-VL / 2.5-VL;
* Llava 1.5 / NeXT (`llava_steps`): llama.cpp's documented route for Hugging Face checkpoints
  (docs/multimodal/llava.md, "LLaVA 1.6"): ``llava_surgery_v2.py`` splits the checkpoint into the CLIP tower and the
  projector, and ``convert_image_encoder_to_gguf.py --clip-model-is-vision`` converts them with a ViT
  ``config.json`` beside them: the model's ``vision_config`` plus the keys the converter reads for Llava
  (``vision_feature_layer``; for NeXT ``image_grid_pinpoints`` and ``mm_patch_merge_type`` ``spatial_unpad``). Their
  language models: ``convert_hf_to_gguf.py`` on the Llava checkpoint; Llava-NeXT's, which that converter does not
  take, saved on its own as a causal LM first (`language_model_folder`, what the same document says to do).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
_TREE = "llama_cpp_python-0.3.36/vendor/llama.cpp"
_PARTS = (
    "convert_hf_to_gguf.py",
    "conversion/",
    "gguf-py/",
    "tools/mtmd/",
    "include/",
    "ggml/include/",
    "vendor/",
    "src/llama-ext.h",
)


def cache_dir() -> Path:
    return Path(os.environ.get("QUICKLORIS_CACHE") or Path.home() / ".cache" / "quickloris")


def source_tree() -> Path:
    """The vendored llama.cpp tree (fetched and unpacked on first use)."""
    env = os.environ.get("QUICKLORIS_LLAMA_CPP_SRC")
    if env:
        return Path(env)
    root = cache_dir() / "llama-cpp-src"
    tree = root / _TREE
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp],
            check=True,
            capture_output=True,
        )
        (archive,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
        unpacked = os.path.join(tmp, "unpacked")
        with tarfile.open(archive) as tf:  # the parts the tests use (~15 of the tree's ~200 MB)
            keep = tuple(f"{_TREE}/{part}" for part in _PARTS)
            tf.extractall(unpacked, members=[m for m in tf.getmembers() if m.name.startswith(keep)], filter="data")
        final = root / _TREE.split("/")[0]
        if not final.exists():
            os.rename(os.path.join(unpacked, _TREE.split("/")[0]), final)
    return tree


# ---- libmtmd ----------------------------------------------------------------------------------------------------


def _llama_lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    return Path(spec.origin).parent / "lib"


def mtmd_library() -> Path:
    """A folder holding libmtmd.so built from `source_tree` against the installed llama-cpp-python's libraries
    (set it as ``MTMD_CPP_LIB`` before importing ``llama_cpp.mtmd_cpp``)."""
    lib = _llama_lib_dir()
    if (lib / "libmtmd.so").is_file():  # a llama-cpp-python built with its multimodal library
        return lib
    libllama = (lib / "libllama.so").resolve()
    key = hashlib.sha1(f"{libllama}:{libllama.stat().st_size}".encode()).hexdigest()[:12]
    out = cache_dir() / f"mtmd-{key}"
    if (out / "libmtmd.so").is_file():
        return out
    src = source_tree()
    mt = src / "tools" / "mtmd"
    cxx = [str(mt / f) for f in ("mtmd.cpp", "mtmd-audio.cpp", "mtmd-image.cpp", "mtmd-helper.cpp", "clip.cpp")]
    cxx += [str(mt / "mtmd-helper-gen.cpp"), str(src / "vendor/hash/hash.cpp"), str(src / "vendor/hash/sha1/sha1.c")]
    cxx += sorted(glob.glob(str(mt / "models" / "*.cpp")))
    cc = [str(src / "vendor/hash/xxhash/xxhash.c"), str(src / "vendor/hash/sha256/sha256.c")]
    inc = [f"-I{src / d}" for d in ("include", "ggml/include", "tools/mtmd", "vendor", "vendor/hash")]
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    cmds = [
        ["g++", "-x", "c++", "-O1", "-fPIC", "-std=c++17", "-w", "-DLLAMA_SHARED", "-DLLAMA_BUILD", *inc, "-c", f]
        for f in cxx
    ] + [["gcc", "-O1", "-fPIC", "-w", *inc, "-c", f] for f in cc]
    objs = []
    procs: list[subprocess.Popen] = []
    jobs = max(1, min(os.cpu_count() or 1, 4))
    for i, cmd in enumerate(cmds):
        obj = str(tmp / f"{i}.o")
        objs.append(obj)
        procs.append(subprocess.Popen([*cmd, "-o", obj], stderr=subprocess.PIPE))
        while sum(p.poll() is None for p in procs) >= jobs:
            procs[[p.poll() is None for p in procs].index(True)].wait()
    for p, cmd in zip(procs, cmds):
        if p.wait() != 0:
            raise RuntimeError(f"compiling {cmd[-1]} failed: {p.stderr.read().decode()[-2000:]}")
    libs = ["-lllama", "-lggml", "-lggml-base", "-lpthread"]
    subprocess.run(
        ["g++", "-shared", "-o", str(tmp / "libmtmd.so"), *objs, f"-L{lib}", *libs, f"-Wl,-rpath,{lib}"], check=True
    )
    for obj in objs:
        os.unlink(obj)
    try:
        os.rename(tmp, out)
    except OSError:  # built meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- converters -------------------------------------------------------------------------------------------------

# Runs llama.cpp's scripts one after the other in one process (importing torch and transformers once): argv[1] is the
# llama.cpp tree, argv[2] a JSON list of [script, args...], argv[3] "vocab" to keep the vocabulary. Two adjustments,
# for this process only: the tiny byte-level test tokenizers are not among convert_hf_to_gguf.py's known
# pre-tokenizers, so text models are written without a vocabulary unless asked (SentencePiece ones have no
# pre-tokenizer to recognise); CLIPVisionModel gets back the `vision_model` level (attribute and state-dict names) that
# convert_image_encoder_to_gguf.py, written for transformers 4, reads.
_DRIVER = textwrap.dedent("""
    import importlib, json, pkgutil, runpy, shutil, sys
    src, steps, keep_vocab = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "vocab"
    sys.path[:0] = [src, src + "/gguf-py"]
    import conversion
    from conversion import base

    def no_vocab(self):
        self.gguf_writer.add_tokenizer_model("none")

    for info in pkgutil.iter_modules(conversion.__path__):
        importlib.import_module(f"conversion.{info.name}")
    todo = [] if keep_vocab else [base.TextModel]
    while todo:
        cls = todo.pop()
        cls.set_vocab = no_vocab
        todo += cls.__subclasses__()
    from transformers.models.clip.modeling_clip import CLIPVisionModel

    CLIPVisionModel.vision_model = property(lambda self: self)
    _state_dict = CLIPVisionModel.state_dict
    CLIPVisionModel.state_dict = lambda self, *a, **k: {
        "vision_model." + n: t for n, t in _state_dict(self, *a, **k).items()
    }
    for script, *args in steps:
        if script == "cp":  # a file copy between two scripts (as the docs' `cp`)
            shutil.copy(*args)
            continue
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
""")


def run_steps(steps: list[list[str]], *, vocab: bool = False) -> None:
    """Run llama.cpp scripts (``[script, args...]`` each, paths relative to the llama.cpp tree) in one process;
    `vocab`: text models keep their vocabulary (the converter's own tokenizer export)."""
    src = source_tree()
    steps = [[script if script == "cp" else str(src / script), *map(str, args)] for script, *args in steps]
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(src), json.dumps(steps), "vocab" if vocab else "none"],
        capture_output=True,
        text=True,
        env=env,
    )
    if res.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def hf_step(folder, out, outtype: str = "f32", *, mmproj: bool = False) -> list[str]:
    """``convert_hf_to_gguf.py`` on a model folder."""
    return ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype, *(["--mmproj"] * mmproj)]


def llava_steps(folder, work, outs: dict[str, str]) -> list[list[str]]:
    """llama.cpp's Llava route on a saved Llava / Llava-NeXT folder, one mmproj per type in `outs` (f16 / f32 ->
    path): the checkpoint in the Hub's layout, llava_surgery_v2.py, the ViT folder (the surgery's CLIP weights and
    a config), convert_image_encoder_to_gguf.py."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((Path(folder) / "config.json").read_text())
    work = Path(work)
    hub, vit = work / "hub", work / "vit"
    hub.mkdir(parents=True)
    vit.mkdir()
    # the Hub's Llava checkpoints keep CLIPVisionModel's `vision_model` level (transformers 5 saves without it)
    tensors = {}
    for k, v in load_file(str(Path(folder) / "model.safetensors")).items():
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower.") :]
        tensors[k] = v
    save_file(tensors, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps(cfg))
    vcfg = dict(cfg["vision_config"], architectures=["CLIPVisionModel"])
    vcfg["vision_feature_layer"] = cfg.get("vision_feature_layer", -2)
    if "image_grid_pinpoints" in cfg:
        vcfg.update(image_grid_pinpoints=cfg["image_grid_pinpoints"], mm_patch_merge_type="spatial_unpad")
    (vit / "config.json").write_text(json.dumps(vcfg))
    pre = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    steps = [
        ["tools/mtmd/legacy-models/llava_surgery_v2.py", "-C", "-m", hub],
        ["cp", hub / "llava.clip", vit / "pytorch_model.bin"],
    ]
    for outtype, out in outs.items():
        args = ["-m", vit, "--llava-projector", hub / "llava.projector", "--output-dir", work / outtype]
        args += ["--clip-model-is-vision", "--image-mean", *pre["image_mean"], "--image-std", *pre["image_std"]]
        args += ["--use-f32"] if outtype == "f32" else []
        steps.append(["tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py", *args])
        steps.append(["cp", work / outtype / f"mmproj-model-{outtype}.gguf", out])
    return steps


def language_model_folder(folder, out_folder) -> Path:
    """A Llava-NeXT checkpoint's language model saved on its own as a causal LM (the route llama.cpp's docs give for
    language models its Llava converter does not take)."""
    import transformers

    m = transformers.AutoModelForImageTextToText.from_pretrained(str(folder))
    lm = transformers.AutoModelForCausalLM.from_config(m.config.text_config)
    state = {
        k.replace("model.language_model.", "model."): v for k, v in m.state_dict().items() if "language_model" in k
    }
    state["lm_head.weight"] = m.lm_head.weight
    lm.load_state_dict(state, strict=True)
    lm.save_pretrained(str(out_folder))
    return Path(out_folder)
