"""Offline random-weight `transformers` checkpoints, saved as Hugging Face directories.

Each ``save_*`` builds a real architecture from a config (seeded, so weights are deterministic),
builds its image processor and tokenizer in code, and writes everything into ``directory`` with
``save_pretrained`` - exactly the layout ``transformers:DIR`` loads. Nothing is downloaded and
nothing is cached outside ``directory``.

Tokenizers: real repos ship their own files. Here they are generated offline:
- CLIP: open_clip's bundled BPE (the same vocab and merges the OpenAI repos ship);
- BERT (ALIGN): a generated uncased WordPiece vocab with bert-base-uncased's special-token ids;
- SigLIP / MetaCLIP 2: a small `tokenizers` Unigram model (SigLIP: SentencePiece-style with
  ``</s>`` appended; MetaCLIP 2: XLM-R style ``<s> ... </s>``).
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["clip_bpe_files", "save_align", "save_clip", "save_metaclip2", "save_siglip"]


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@lru_cache(maxsize=1)
def clip_bpe_files() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of OpenAI CLIP's BPE, rebuilt from open_clip's bundled vocab file.

    vocab has 49408 entries, ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407, as in the
    ``vocab.json`` / ``merges.txt`` of the openai/clip-* repos.
    """
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(_bytes_to_unicode().values())
    vocab_list = units + [u + "</w>" for u in units]
    vocab_list += ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def _clip_words(limit: int) -> list[str]:
    """Lower-case ASCII words (most frequent merges first) from the CLIP vocab, for test vocabs."""
    vocab, _ = clip_bpe_files()
    words: list[str] = []
    seen: set[str] = set()
    for tok in vocab:
        if tok.endswith("</w>"):
            w = tok[:-4]
            if len(w) > 1 and w.isascii() and w.isalpha() and w.islower() and w not in seen:
                seen.add(w)
                words.append(w)
                if len(words) >= limit:
                    break
    return words


def _clip_tokenizer(directory: Path):
    """CLIPTokenizer from vocab.json + merges.txt written into ``directory`` (as openai repos)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_files()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    return CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        model_max_length=77,
    )


def _encoder(*, width: int, layers: int, heads: int, mlp: int, **extra: Any) -> dict[str, Any]:
    """A transformers encoder config (``text_config`` / ``vision_config``) of these sizes, plus
    the tower's own keys in ``extra``."""
    return {"hidden_size": width, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": heads, **extra}


_CLIP_SIZES = {
    # name: (vision width, layers, heads, patch, image size, text width, layers, heads, proj)
    "small": (64, 2, 4, 16, 64, 64, 2, 4, 48),
    # int8 tests: at width 64 a random text tower's int8 centred error sits near the 0.15 gate
    # (0.16-0.20 measured); at 128 it is 0.09-0.10 for seeds 0 and 1, well inside it
    "int8": (128, 2, 4, 16, 64, 128, 2, 4, 64),
    "vit-b-32": (768, 12, 12, 32, 224, 512, 12, 8, 512),
}


def save_clip(
    directory: str | Path,
    size: str = "small",
    *,
    eos_token_id: int = 2,
    hidden_act: str = "quick_gelu",
    seed: int = 0,
) -> Path:
    """Save a random-weight ``CLIPModel`` (model_type "clip") with its processor into ``directory``.

    size: "small" (64x64 input, 2+2 layers) or "vit-b-32" (the OpenAI ViT-B/32 shapes).
    eos_token_id: 2 reproduces the released openai/metaclip repos' legacy text config (pooling at
        the argmax of the ids); 49407 selects the first-EOS pooling path.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    if size not in _CLIP_SIZES:
        raise ValueError(f"size must be one of {sorted(_CLIP_SIZES)}, got {size!r}")
    vw, vl, vh, patch, image, tw, tl, th, proj = _CLIP_SIZES[size]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config=_encoder(width=tw, layers=tl, heads=th, mlp=4 * tw, vocab_size=49408,
                             max_position_embeddings=77, hidden_act=hidden_act,
                             bos_token_id=0 if eos_token_id == 2 else 49406,
                             eos_token_id=eos_token_id, pad_token_id=1),
        vision_config=_encoder(width=vw, layers=vl, heads=vh, mlp=4 * vw, patch_size=patch,
                               image_size=image, hidden_act=hidden_act),
        projection_dim=proj,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)  # ln(100), the trained OpenAI value
    model.save_pretrained(directory)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image}, crop_size={"height": image, "width": image}
        ),
        tokenizer=_clip_tokenizer(directory),
    )
    processor.save_pretrained(directory)
    return directory


def _bert_vocab(vocab_size: int) -> list[str]:
    """Uncased WordPiece vocab laid out like bert-base-uncased: [PAD]=0, [UNK]=100, [CLS]=101,
    [SEP]=102, [MASK]=103, then characters, ``##`` pieces and whole words up to ``vocab_size``."""
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
    tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [c for c in "!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~"]
    tokens += chars + ["##" + c for c in chars if c.isalnum()]
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size must be at least {len(tokens)}, got {vocab_size}")
    present = set(tokens)
    for w in _clip_words(vocab_size):
        if len(tokens) >= vocab_size:
            break
        if w not in present:
            tokens.append(w)
            present.add(w)
    i = 0
    while len(tokens) < vocab_size:  # pad with unused ids so the embedding table matches the config
        tokens.append(f"[unused{99 + i}]")
        i += 1
    return tokens


def _lecun_linears(module: torch.nn.Module, gain: float = 1.0) -> None:
    """Re-draw Linear weights with std gain / sqrt(fan_in) (the scale trained weights have).

    HF's std-0.02 init is far below 1/sqrt(width) for narrow test models: attention stays
    uniform, every text pools to nearly the same vector (cosine 0.9999 between unrelated texts),
    which makes retrieval / fidelity checks on these models meaningless.
    """
    for mod in module.modules():
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.normal_(mod.weight, std=gain / mod.in_features**0.5)


BN_WEIGHT = 0.3
RESIDUAL_BRANCH_SCALE = 0.1


def _calibrate_efficientnet(vision: torch.nn.Module, image_size: int) -> None:
    """Make random EfficientNet weights behave like trained ones.

    HF's init (normal std 0.02 convs, BatchNorm running stats 0/1) shrinks activations ~1e4x per
    block, to ~1e-28 at the top: useless for fidelity tests (and fp16 would flush it to zero).
    Kaiming (fan_in) convs, then BatchNorm running statistics measured on one random batch in
    [-1, 1] (cumulative average), give unit-scale activations through all blocks.

    BatchNorm weights start at BN_WEIGHT, and at RESIDUAL_BRANCH_SCALE for the last BatchNorm of
    each block that adds its input back. With HF's unit weights the random network is chaotic, as
    BatchNorm networks at initialisation are: it amplified relative perturbations ~20-40x (fp16
    rounding of the stem alone moved the embeddings by 5e-3), so the fp16 error of the tiny model
    depended on the seed: image centred error on photos median 5e-3, up to 1e-2 over seeds 0-15,
    and 2 of those 16 seeds failed the 1e-2 fp16 export gate. Trained networks have small BatchNorm
    weights and residual branches small next to the stream; with these the same 16 seeds give
    median 1.9e-3, max 2.6e-3, and embeddings of different photos stay as far apart as before
    (centred norm 0.6-0.9 of the unit norm).
    """
    for mod in vision.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
            torch.nn.init.constant_(mod.weight, BN_WEIGHT)
    for block in vision.encoder.blocks:
        if block.projection.apply_dropout:  # stride 1, no id_skip: output = input + branch
            torch.nn.init.constant_(block.projection.project_bn.weight, RESIDUAL_BRANCH_SCALE)
    vision.train()
    # Statistics from noise alone leave smooth images (gradients, flat colours) far outside the
    # calibrated range: their embeddings grew to norm ~1e3-1e6 (photos: ~10) and fp32 round-off
    # dominated. A mix of noise, flat images and the built-in varied images keeps every kind of
    # input at unit scale.
    from PIL import Image

    from clipfast.artifact.samples import sample_images

    varied = [np.asarray(Image.fromarray(a).convert("RGB").resize((image_size, image_size)))
              for a in sample_images(6)]
    batch = torch.from_numpy(np.stack(varied)).permute(0, 3, 1, 2).float() / 127.5 - 1
    flat = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 3, image_size, image_size)
    batch = torch.cat([batch, flat, torch.rand(2, 3, image_size, image_size) * 2 - 1])
    with torch.no_grad():
        vision(pixel_values=batch)
    vision.eval()
    for mod in vision.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = vision.config.batch_norm_momentum


def save_align(directory: str | Path, full: bool = True, *, seed: int = 0) -> Path:
    """Save a random-weight ``AlignModel`` with its processor into ``directory``.

    full=True: the released kakaobrain/align-base shapes - EfficientNet-B7 image tower at 289x289
    (640-channel top, no projection), BERT-base text tower, 640-d text projection.
    full=False: a tiny EfficientNet + BERT with the same structure (64x64 input).
    The processor is the released one: resize to 346x346 (bilinear), center crop 289, rescale to
    [-1, 1] (1/127.5 with offset), no mean/std, BERT uncased tokenizer with max length 64.
    """
    from transformers import (
        AlignConfig,
        AlignModel,
        AlignProcessor,
        BertTokenizer,
        EfficientNetImageProcessor,
    )
    from transformers.image_utils import PILImageResampling

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if full:
        # kakaobrain/align-base: EfficientNet-B7 coefficients, image_size 289, hidden_dim 640
        vision = {"image_size": 289, "hidden_dim": 640, "depthwise_padding": []}
        text = {}  # BERT-base defaults (vocab 30522, 768 wide, 12 layers)
        resize, crop, vocab_size = 346, 289, 30522
    else:
        vision = {
            "image_size": 64,
            "width_coefficient": 0.25,
            "depth_coefficient": 0.34,
            "hidden_dim": 160,
            "depthwise_padding": [],
        }
        text = _encoder(width=64, layers=2, heads=4, mlp=128, vocab_size=1024)
        resize, crop, vocab_size = 76, 64, 1024
    config = AlignConfig(text_config=text, vision_config=vision, projection_dim=640 if full else 80)
    torch.manual_seed(seed)
    model = AlignModel(config).eval()
    _calibrate_efficientnet(model.vision_model, config.vision_config.image_size)
    if not full:
        _lecun_linears(model.text_model.encoder)
    with torch.no_grad():
        model.temperature.fill_(0.0125)  # a plausible trained value (logit scale 80)
    model.save_pretrained(directory)

    vocab_text = "\n".join(_bert_vocab(vocab_size)) + "\n"
    (directory / "vocab.txt").write_text(vocab_text, encoding="utf-8")
    tokenizer = BertTokenizer(vocab=str(directory / "vocab.txt"), model_max_length=64)
    image_processor = EfficientNetImageProcessor(
        size={"height": resize, "width": resize},
        crop_size={"height": crop, "width": crop},
        do_center_crop=True,
        rescale_factor=1 / 127.5,
        rescale_offset=True,
        do_normalize=False,
        include_top=False,
        resample=PILImageResampling.BILINEAR,
    )
    AlignProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def _unigram_pieces(n_words: int) -> list[tuple[str, float]]:
    """SentencePiece-style pieces: whole words with "▁", then single characters (fallback)."""
    pieces = [("▁" + w, -2.0 - i / 1000.0) for i, w in enumerate(_clip_words(n_words))]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()&/"
    pieces += [("▁", -3.0)] + [(c, -8.0) for c in chars] + [("▁" + c, -7.0) for c in chars]
    return pieces


def save_siglip(directory: str | Path, *, seed: int = 0) -> Path:
    """Save a small random-weight ``SiglipModel`` (64x64, patch 16) with its processor.

    Tokenizer: a small Unigram (lower-cased, ``</s>`` appended, padded with ``</s>`` to 64) standing
    in for the released SentencePiece model; real google/siglip-* repos ship ``spiece.model``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import (
        PreTrainedTokenizerFast,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + _unigram_pieces(1500)
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="</s>",
        unk_token="<unk>",
        model_max_length=64,
        model_input_names=["input_ids"],
    )
    config = SiglipConfig(
        text_config=_encoder(width=64, layers=2, heads=4, mlp=128, vocab_size=len(vocab),
                             max_position_embeddings=64, bos_token_id=None, pad_token_id=1,
                             eos_token_id=1),
        vision_config=_encoder(width=64, layers=2, heads=4, mlp=128, image_size=64,
                               patch_size=16),
    )
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    _lecun_linears(model.text_model.encoder, gain=2.0)
    with torch.no_grad():  # released SigLIP values: scale ~ exp(4.7), bias ~ -12.7
        model.logit_scale.fill_(4.7)
        model.logit_bias.fill_(-12.7)
    model.save_pretrained(directory)
    image_processor = SiglipImageProcessor(size={"height": 64, "width": 64})
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def save_metaclip2(directory: str | Path, *, seed: int = 0) -> Path:
    """Save a small random-weight ``MetaClip2Model`` (model_type "metaclip_2") with its processor.

    Tokenizer: a small XLM-R style Unigram (``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3),
    standing in for the released facebook/xlm-v-base tokenizer the MetaCLIP 2 repos ship.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPProcessor,
        MetaClip2Config,
        MetaClip2Model,
        XLMRobertaTokenizer,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += _unigram_pieces(1500) + [("<mask>", 0.0)]
    tokenizer = XLMRobertaTokenizer(vocab=vocab, model_max_length=77)
    config = MetaClip2Config(
        text_config=_encoder(width=64, layers=2, heads=4, mlp=256, vocab_size=len(vocab),
                             max_position_embeddings=77, bos_token_id=0, pad_token_id=1,
                             eos_token_id=2),  # as in the released weights (XLM-R "</s>")
        vision_config=_encoder(width=64, layers=2, heads=4, mlp=256, image_size=64,
                               patch_size=16),
        projection_dim=48,
    )
    torch.manual_seed(seed)
    model = MetaClip2Model(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(4.6052)
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory
