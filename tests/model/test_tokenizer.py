"""Tokenizer tests: token-id parity with the official cn_clip tokenizer, padding, vocabularies, errors."""

from __future__ import annotations

import builtins
import importlib.util
import io
import os
import random

import pytest
import torch

from cnclip.errors import VocabularyError
from cnclip.model import tokenizer as tok
from cnclip.model.tokenizer import CONTEXT_LENGTH, DEFAULT_VOCAB, Tokenizer, normalize_text, tokenize

cn_clip_clip = pytest.importorskip("cn_clip.clip")

HAND_WRITTEN = [
    # plain Chinese captions
    "一只猫坐在窗台上晒太阳",
    "傍晚的西湖，远处是雷峰塔。",
    "两个小朋友在公园里放风筝",
    "雪后的故宫红墙与金色屋顶",
    "桌上摆着一碗热气腾腾的兰州拉面",
    "𠀀𠀁𪚥 and 㐀㐁 (CJK extension blocks)",
    "\uf900\uf901\uf902 compatibility ideographs, \U0002f800 supplement",
    # mixed Chinese / English / digits
    "iPhone 15 Pro拍的夜景",
    "用Canon EOS R5拍摄的4K照片",
    "2023年10月1日国庆节天安门广场",
    "GPT-4o和Claude 3.5的对比",
    "COVID-19疫情期间的上海",
    "H2O是水的化学式",
    "WiFi密码是abc123",
    "unaffable",
    # full-width punctuation, letters and digits
    "ＡＢＣ１２３，。！？【】《》",
    "你好，世界！今天天气怎么样？",
    "「引号」『书名』〈篇名〉——破折号……省略号",
    "（括号）［方括号］｛花括号｝～波浪号",
    "价格：￥１９９．００元／件",
    "Ｈｅｌｌｏ　Ｗｏｒｌｄ",
    # curly and other quotes
    "他说：“我们走吧。”",
    "“Hello” and ‘world’",
    "„German“ «French» ‹single›",
    # emoji, ZWJ sequences, skin tones, flags, keycaps
    "今天好开心😀😀",
    "一家人👨‍👩‍👧‍👦去旅行",
    "点赞👍🏽👍🏿",
    "hello👋world",
    "国旗🇨🇳和🇺🇸",
    "1️⃣2️⃣3️⃣",
    "❤️ love ♥",
    "🏳️‍🌈 pride",
    # accented Latin and other Latin specials
    "café naïve résumé Ångström",
    "İstanbul ΟΔΟΣ ΣΊΣΥΦΟΣ",
    "Straße ß ﬁ ligature",
    "Crème brûlée是法国甜点",
    "ǅ ǈ Dž titlecase digraphs",
    # Japanese kana, Korean hangul, Arabic, others
    "ひらがなとカタカナ",
    "がぎぐげご パピプペポ",
    "東京タワーの夜景",
    "ｶﾀｶﾅ half-width katakana",
    "한국어 텍스트입니다",
    "서울의 밤",
    "مرحبا بالعالم",
    "שלום עולם",
    "Привет, мир!",
    "नमस्ते दुनिया",
    "สวัสดีครับ",
    "Ελληνικά κείμενα",
    # control characters, tabs, newlines and exotic whitespace
    "第一行\n第二行\r\n第三行",
    "tab\tseparated\twords",
    "bell\x07char and nul\x00char",
    "vertical\x0btab form\x0cfeed",
    "next\x85line",
    "line\u2028separator\u2029paragraph",
    "no\u00a0break\u3000ideographic\u2003em space",
    "zero\u200bwidth\u200cnon\u200djoiner",
    "soft\u00adhyphen and bom\ufeffmark",
    "replacement\ufffdchar",
    "lone surrogate \ud800 here",
    "\x1c\x1d\x1e\x1f separators",
    "\u0301 leading combining mark",
    # empty and whitespace-only
    "",
    " ",
    "   \t\n  ",
    "\u3000\u3000",
    # literal special-token text
    "[CLS]",
    "[MASK]",
    "[SEP] [PAD] [UNK]",
    "一只[MASK]在吃东西",
    "##ing",
    "###",
    # URLs, emails, numbers with separators, symbols
    "https://www.example.com/path?query=1&lang=zh#anchor",
    "请访问 http://baidu.com 获取更多",
    "联系 someone@example.org",
    "1,234,567.89",
    "3.1415926",
    "12:30:45",
    "１，０００，０００",
    "100% 50‰ 30°C",
    "$100 ^_^ `code` ~tilde~ |pipe|",
    "α+β=γ ∑∫√∞ ≈ ≠",
    "©®™ ¥€£",
    "<html><body>标签</body></html>",
    # very long: many tokens, and one word longer than 200 characters
    "这是一个非常长的句子，" * 20,
    "long english sentence with many many words " * 10,
    "a" * 201,
    "a" * 200,
    "supercalifragilisticexpialidocious" * 7,
    "abc" * 70 + "中文" + "def" * 70,
    "😀" * 250,
]

# Pools the seeded random strings draw from, weighted toward what real captions contain.
_POOLS = [
    "一只猫狗鸟鱼在的了是和与山水天空海边城市夜景人群花草树木红黄蓝绿白黑大小美丽高楼街道汽车自行车",
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    "，。！？、；：“”‘’（）【】《》—…·",
    ",.!?;:'\"()[]{}<>-_=+*/\\|@#$%^&`~",
    "ＡＢＣｘｙｚ０１２３",
    "éèêëàâäôöùûüçñÅØ",
    "あいうえおカキクケコがぱ",
    "가나다라마바사한국",
    "😀👍🏽❤️🇨🇳👨‍👩‍👧",
    " \t\n\u3000\u00a0",
    "\x00\x07\x0b\x85\u200b\u200d\ufeff\ufffd",
]


def _random_strings(n: int, seed: int = 20240601) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([0, 1, 3, 8, 15, 30, 60, 120])
        chars = []
        for _ in range(length):
            pool = rng.choices(_POOLS, weights=[30, 10, 5, 6, 4, 2, 2, 2, 2, 2, 6, 1])[0]
            chars.append(rng.choice(pool))
        out.append("".join(chars))
    # A few strings of arbitrary code points (surrogates excluded), to catch Unicode-category mistakes.
    for _ in range(20):
        cps = [rng.randrange(0x20, 0x30000) for _ in range(rng.randrange(1, 40))]
        out.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
    return out


CORPUS = HAND_WRITTEN + _random_strings(220)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 200
    assert len(set(CORPUS)) >= 200


@pytest.mark.parametrize("context_length", [CONTEXT_LENGTH, 16, 77])
def test_ids_equal_official(context_length):
    ours = tokenize(CORPUS, context_length=context_length)
    theirs = cn_clip_clip.tokenize(CORPUS, context_length=context_length)
    assert ours.dtype == theirs.dtype == torch.long
    assert ours.shape == theirs.shape == (len(CORPUS), context_length)
    mismatched = [CORPUS[i] for i in range(len(CORPUS)) if not torch.equal(ours[i], theirs[i])]
    assert mismatched == []


def test_pieces_equal_official(tokenizer):
    # Untruncated pieces: catches differences beyond the first 50 tokens too.
    official = cn_clip_clip._tokenizer
    for text in CORPUS:
        assert tokenizer.tokenize(text) == official.tokenize(text), text


def test_single_string_equals_official():
    text = "iPhone 15 Pro拍的夜景"
    assert torch.equal(tokenize(text), cn_clip_clip.tokenize(text))
    assert tokenize(text).shape == (1, CONTEXT_LENGTH)


def _official_preprocess():
    try:
        from cn_clip.training.data import _preprocess_text
    except ImportError:  # its module needs lmdb/timm; the function itself is two lines

        def _preprocess_text(text: str) -> str:
            return text.lower().replace("“", '"').replace("”", '"')

    return _preprocess_text


def test_normalize_text_matches_official_preprocessing():
    preprocess = _official_preprocess()
    subset = [s for s in HAND_WRITTEN if any(q in s for q in "“”")] + HAND_WRITTEN[:40] + CORPUS[-60:]
    assert any("“" in s for s in subset)
    for text in subset:
        assert normalize_text(text) == preprocess(text)
    ours = tokenize([normalize_text(t) for t in subset])
    theirs = cn_clip_clip.tokenize([preprocess(t) for t in subset])
    assert torch.equal(ours, theirs)


def test_normalize_text_quotes():
    assert normalize_text("他说：“走吧”ABC") == '他说："走吧"abc'
    # Without normalization the curly quotes are out of vocabulary.
    assert Tokenizer().tokenize("“") == ["[UNK]"]


def test_dynamic_padding(tokenizer):
    texts = ["猫", "一只猫坐在窗台上", "", "这是一个非常长的句子，" * 10]
    fixed = tokenize(texts)
    dynamic = tokenizer(texts)
    rows = [tokenizer.encode(t) for t in texts]
    assert dynamic.dtype == torch.long
    assert dynamic.shape == (len(texts), max(len(r) for r in rows))
    for i, row in enumerate(rows):
        assert dynamic[i, : len(row)].tolist() == row
        assert fixed[i, : len(row)].tolist() == row
        assert (dynamic[i, len(row) :] == tokenizer.pad_id).all()
        assert (fixed[i, len(row) :] == tokenizer.pad_id).all()

    short = tokenizer(["猫", "狗狗"])
    assert short.shape == (2, 4)
    assert short.tolist() == [[101, 4344, 102, 0], [101, 4318, 4318, 102]]
    assert tokenizer(texts, pad_to_longest=False).shape == (len(texts), CONTEXT_LENGTH)
    assert torch.equal(tokenizer(texts, pad_to_longest=False), fixed)
    assert tokenizer(texts, context_length=8, pad_to_longest=False).shape == (len(texts), 8)


def test_encode_truncates_and_keeps_sep(tokenizer):
    ids = tokenizer.encode("猫" * 100)
    assert len(ids) == CONTEXT_LENGTH
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert tokenizer.encode("") == [tokenizer.cls_id, tokenizer.sep_id]
    assert Tokenizer(context_length=2).encode("猫狗") == [tokenizer.cls_id, tokenizer.sep_id]


def test_default_vocab_properties(tokenizer):
    assert tokenizer.vocab_path == DEFAULT_VOCAB
    assert tokenizer.vocab_size == 21128
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == (
        0,
        100,
        101,
        102,
        103,
    )
    assert tokenizer.convert_ids_to_tokens([101, 102]) == ["[CLS]", "[SEP]"]
    assert tokenizer.convert_tokens_to_ids(["[MASK]", "猫", "not-a-token"]) == [103, 4344, 100]
    with pytest.raises(ValueError, match="21128"):
        tokenizer.convert_ids_to_tokens([21128])


def _write_vocab(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_custom_vocab_wins(tmp_path):
    vocab = _write_vocab(tmp_path / "vocab.txt", ["[MASK]", "[SEP]", "[CLS]", "[UNK]", "[PAD]", "猫", "狗", "a", "##b"])
    custom = Tokenizer(vocab)
    assert custom.vocab_path == vocab
    assert custom.vocab_size == 9
    assert (custom.mask_id, custom.sep_id, custom.cls_id, custom.unk_id, custom.pad_id) == (0, 1, 2, 3, 4)
    assert custom.tokenize("猫ab 狗 鱼") == ["猫", "a", "##b", "狗", "[UNK]"]
    assert custom.encode("猫ab 狗 鱼") == [2, 5, 7, 8, 6, 3, 1]
    # Padding uses this vocabulary's [PAD], which here is not 0.
    assert custom(["猫", "狗狗"]).tolist() == [[2, 5, 1, 4], [2, 6, 6, 1]]
    # A checkpoint folder holding vocab.txt works too.
    assert Tokenizer(tmp_path).vocab_path == vocab


def test_missing_vocab(tmp_path):
    path = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(VocabularyError) as info:
        Tokenizer(path)
    _assert_one_line_naming(info.value, path)


def test_empty_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(VocabularyError) as info:
        Tokenizer(path)
    _assert_one_line_naming(info.value, path)
    assert "empty" in str(info.value)


def test_vocab_lacking_unk(tmp_path):
    path = _write_vocab(tmp_path / "vocab.txt", ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "猫"])
    with pytest.raises(VocabularyError) as info:
        Tokenizer(path)
    _assert_one_line_naming(info.value, path)
    assert "[UNK]" in str(info.value)


def test_non_utf8_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(VocabularyError) as info:
        Tokenizer(path)
    _assert_one_line_naming(info.value, path)


def _assert_one_line_naming(error, path):
    message = str(error)
    assert str(path) in message
    assert "\n" not in message


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(context_length=1)
    with pytest.raises(ValueError, match="context_length"):
        tokenizer(["猫"], context_length=0)
    with pytest.raises(ValueError, match="context_length"):
        tokenize("猫", context_length=1)
    with pytest.raises(TypeError, match="int"):
        tokenizer(["猫", 3])
    with pytest.raises(TypeError, match="NoneType"):
        tokenize(["猫", None])
    with pytest.raises(TypeError, match="bytes"):
        tokenizer(b"cat")
    with pytest.raises(TypeError, match="int"):
        tokenizer.tokenize(5)
    with pytest.raises(TypeError, match="int"):
        tokenizer(5)
    assert torch.equal(tokenizer(("猫", "狗")), tokenizer(t for t in ["猫", "狗"]))


def test_module_level_tokenize_shape():
    out = tokenize(["一只猫", "a dog", ""])
    assert out.shape == (3, CONTEXT_LENGTH)
    assert out.dtype == torch.long
    assert tok.default_tokenizer() is tok.default_tokenizer()
    assert tokenize([]).shape == (0, CONTEXT_LENGTH)


def test_import_does_not_read_vocab(monkeypatch):
    # Executes a fresh copy of the module with every file open recorded (a subprocess would spend seconds
    # importing torch again); reading the vocabulary afterwards proves the probe can see it.
    opened = []
    real_open = io.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    spec = importlib.util.spec_from_file_location("cnclip._fresh_tokenizer_copy", tok.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)

    assert fresh._default is None
    assert not [p for p in opened if p.endswith("vocab.txt")]
    fresh.tokenize("猫")
    assert fresh._default is not None
    assert [p for p in opened if p.endswith("vocab.txt")]


# Inputs whose characters `tokenizers`' own BertNormalizer + BertPreTokenizer treat otherwise than the
# official code (other Unicode tables and rules); the character steps done in Python keep them equal.
TOKENIZERS_DIVERGENCES = [
    "ΟΔΟΣ ΣΊΣΥΦΟΣ σοφοΣ. ΑΣ\x07Β",  # str.lower's final-sigma rule, per whitespace word
    "a\ue000b \U000f0000 \U00100000x",  # private-use characters: kept (and [UNK]) officially, dropped there
    "a\u1c89b a\ua7cbb",  # letters newer than this Python's Unicode data (the official code sees Cn)
    "a𫠠b 𫠡𫠢",  # CJK Extension E: split into single characters officially
    "a\u061db a\u2e55b a\u2e5db",  # punctuation newer than one table and older than the other
    "a\u07fdb a\u0898b a\u0890b",  # nonspacing marks and format characters the tables date differently
    "a\u1734b a\u166db",
]


def test_tokenizers_divergences_equal_official(tokenizer):
    official = cn_clip_clip._tokenizer
    for text in TOKENIZERS_DIVERGENCES:
        assert tokenizer.tokenize(text) == official.tokenize(text), text
    assert torch.equal(tokenize(TOKENIZERS_DIVERGENCES), cn_clip_clip.tokenize(TOKENIZERS_DIVERGENCES))


def test_lone_surrogates_give_unk_like_official(tokenizer):
    # A surrogate cannot be passed to the Rust matcher; the word holding it is [UNK], as officially.
    texts = ["ab\ud800cd", "\udfff", "中\ud800文", "猫 x\udc00 狗", "a" * 199 + "\ud800", "\ud800," * 3]
    official = cn_clip_clip._tokenizer
    for text in texts:
        assert tokenizer.tokenize(text) == official.tokenize(text), ascii(text)
    assert torch.equal(tokenize(texts), cn_clip_clip.tokenize(texts))


def test_repeated_words_hit_the_cache_with_equal_results(tokenizer):
    fresh = Tokenizer()
    first = [fresh.encode(t) for t in CORPUS]
    assert [fresh.encode(t) for t in CORPUS] == first
    assert first == [tokenizer.encode(t) for t in CORPUS]


def test_threads_get_the_same_ids(tokenizer):
    from concurrent.futures import ThreadPoolExecutor

    fresh = Tokenizer()  # an empty cache, so threads fill it concurrently
    expected = [tokenizer.encode(t) for t in CORPUS]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fresh.encode, CORPUS * 4))
    assert results == expected * 4


def test_custom_vocab_with_repeats_equals_official(tmp_path):
    from cn_clip.clip.bert_tokenizer import FullTokenizer

    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "猫", "un", "##aff", "##able", "a", "##b", "猫", "", "!"]
    vocab = _write_vocab(tmp_path / "vocab.txt", lines)
    ours, theirs = Tokenizer(vocab), FullTokenizer(vocab_file=str(vocab))
    assert ours.vocab_size == len(lines)
    for text in ["猫ab 狗!", "unaffable!猫", "ab" * 101, "", "UNAFFABLE ÄB"]:
        pieces = ours.tokenize(text)
        assert pieces == theirs.tokenize(text), text
        assert ours.convert_tokens_to_ids(pieces) == theirs.convert_tokens_to_ids(pieces), text
    # A repeated line keeps its last id, as the official loader's dict assignment does.
    assert ours.encode("猫") == [2, 11, 3]
