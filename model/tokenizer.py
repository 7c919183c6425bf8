"""An in-memory CLIP tokenizer for the offline tiny configuration (no hub, no files)."""

from __future__ import annotations

from transformers import CLIPTokenizer

# Words that become single tokens. Anything else falls apart into smaller pieces (down to single
# characters), exactly as a real BPE vocabulary treats rare words.
CAPTION_WORDS = """
a an the of in on at with and to into from over under through by its his her their is are
make turn change add remove replace it them him as like style painting photo video cartoon
man woman person people boy girl child dog cat horse bird fish car truck bus boat train bike
tree trees forest road street city beach sea ocean river lake mountain mountains sky cloud clouds
snow snowy rain rainy sun sunny sunset night day winter summer autumn spring fire water sand
red blue green yellow orange purple pink black white gray grey brown golden silver
circle square triangle shape shapes ball box background foreground object objects
walking running jumping swimming flying driving riding dancing surfing skiing turning moving
slowly quickly across around along down up left right camera pans zooms
van gogh watercolor oil sketch pixel art anime lego marble gold glass wooden stone
color colour paint bouncing gliding sliding resting standing still sitting
""".split()

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> list[str]:
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses for raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly merge the lowest-ranked adjacent pair."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges: all byte characters (plain and word-final) plus whole-word merges.

    Each listed word gets the merges that join whatever pieces the earlier merges leave of it, so
    it tokenizes to one token; every other word still tokenizes, into several pieces.
    """
    words = CAPTION_WORDS if words is None else words
    alphabet = _byte_alphabet()
    tokens = list(alphabet) + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            tokens.append(pieces[0] + pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    tokens += list(SPECIAL_TOKENS)
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, list(ranks)


def tiny_clip_tokenizer(model_max_length: int = 77, words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer built fully in memory over :data:`CAPTION_WORDS`."""
    vocab, merges = build_vocab(words)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


UMT5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def tiny_umt5_tokenizer(model_max_length: int = 512, words: list[str] | None = None):
    """A UMT5-style tokenizer built in memory: a ``tokenizers`` Unigram model over
    :data:`CAPTION_WORDS` (each a ``▁word`` piece) and single characters, pad 0, eos 1, unk 2, with
    ``</s>`` appended, wrapped as ``T5TokenizerFast`` (what ``AutoTokenizer`` loads from its folder)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = CAPTION_WORDS if words is None else words
    characters = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    # log-probabilities: whole words are likelier than their letters, so they stay one piece
    vocab = [(token, 0.0) for token in UMT5_SPECIAL_TOKENS] + [("▁", -2.0)]
    vocab += [(f"▁{word}", -5.0) for word in dict.fromkeys(words)]
    vocab += [(c, -10.0) for c in characters] + [(f"▁{c}", -9.0) for c in characters]
    model = Tokenizer(models.Unigram(list(dict(vocab).items()), unk_id=2, byte_fallback=False))
    model.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)
