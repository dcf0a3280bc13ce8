"""Checks on generated medical text in Chinese: is it a refusal, is it Chinese, would it need a
picture, which drug names and quantities does it state, and which lines of a consultation turn
are the speaker's own. They read text only, without the pipeline that made it; distillation
(nanohuatuo/distill.py) uses them to filter instructions, answers and turns, and to flag a
polished reply whose facts differ from the original's; evaluation (evaluate.py dialogue) to keep
its patient model to the patient's lines:

    instruction_problem("我咳嗽三天了，要吃什么药？")        # None: kept (else "too short", "refusal", ...)
    fact_check("阿莫西林一天三次", "阿莫西林每天两次")   # {"missing": ["3"], "added": ["2"]}

- is_refusal: a refusal or an AI disclaimer (REFUSALS, Chinese and English).
- chinese_share: CJK characters among the letters of a text.
- instruction_problem: why a generated instruction is not kept (length, Chinese, refusal,
  MEDIA_WORDS), or None.
- fact_check: the drug names (`drug_terms`: DRUG_NAMES, plus the typical generic-name endings
  DRUG_ENDINGS) and the quantities (`numbers`: Arabic and Chinese numerals before NUMBER_UNITS)
  one text has and the other lacks. A simple check by design: it does not read meaning.
- own_lines: what one side of a consultation says in a reply that may go on to write the other
  side's lines too (SPEAKER_TAGS: 患者：..., 医生：...).
"""

import re
import unicodedata

# A refusal or an AI disclaimer makes an instruction, an answer or a turn unusable.
REFUSALS = ("作为一个人工智能", "作为人工智能", "作为一个AI", "作为AI", "作为一名AI", "我是一个AI", "我是AI",
            "AI助手", "语言模型", "我无法回答", "我不能回答", "无法提供医疗建议", "抱歉，我无法", "抱歉，我不能",
            "对不起，我无法", "对不起，我不能", "as an ai", "i'm sorry", "i am sorry", "i cannot", "i can't")
MEDIA_WORDS = ("图片", "照片", "图像", "附图", "附件", "视频", "如图", "截图", "录音")  # text cannot answer these

# Drug names the polish check looks for (generic names, written for this project), and the name
# endings that mark most other Chinese generic names; see fact_check.
DRUG_NAMES = (
    "阿莫西林", "克拉维酸", "头孢呋辛", "头孢克肟", "头孢曲松", "阿奇霉素", "克拉霉素", "红霉素", "左氧氟沙星",
    "莫西沙星", "甲硝唑", "替硝唑", "呋喃妥因", "磷霉素", "多西环素", "米诺环素", "莫匹罗星", "夫西地酸",
    "布洛芬", "对乙酰氨基酚", "阿司匹林", "双氯芬酸", "塞来昔布", "洛索洛芬", "氯雷他定", "西替利嗪", "依巴斯汀",
    "扑尔敏", "氯苯那敏", "孟鲁司特", "沙丁胺醇", "布地奈德", "氨溴索", "右美沙芬", "奥司他韦", "阿昔洛韦",
    "伐昔洛韦", "泛昔洛韦", "奥美拉唑", "雷贝拉唑", "泮托拉唑", "艾司奥美拉唑", "铝碳酸镁", "枸橼酸铋钾",
    "蒙脱石散", "益生菌", "乳果糖", "聚乙二醇", "多潘立酮", "莫沙必利", "匹维溴铵", "二甲双胍", "格列美脲",
    "阿卡波糖", "胰岛素", "氨氯地平", "硝苯地平", "缬沙坦", "厄贝沙坦", "氯沙坦", "依那普利", "贝那普利",
    "美托洛尔", "比索洛尔", "氢氯噻嗪", "螺内酯", "呋塞米", "阿托伐他汀", "瑞舒伐他汀", "辛伐他汀", "他汀",
    "氯吡格雷", "华法林", "硝酸甘油", "单硝酸异山梨酯", "地高辛", "别嘌醇", "非布司他", "秋水仙碱", "苯溴马隆",
    "左甲状腺素", "甲巯咪唑", "丙硫氧嘧啶", "泼尼松", "甲泼尼龙", "地塞米松", "氢化可的松", "可的松", "糠酸莫米松",
    "卤米松", "他克莫司", "吡美莫司", "阿达帕林", "过氧苯甲酰", "维A酸", "异维A酸", "克霉唑", "咪康唑", "酮康唑",
    "氟康唑", "伊曲康唑", "特比萘芬", "联苯苄唑", "阿昔莫司", "玻璃酸钠", "人工泪液", "妥布霉素", "加替沙星",
    "阿托品", "舍曲林", "氟西汀", "帕罗西汀", "艾司西酞普兰", "文拉法辛", "米氮平", "阿普唑仑", "艾司唑仑",
    "劳拉西泮", "唑吡坦", "卡马西平", "奥卡西平", "普瑞巴林", "加巴喷丁", "氟桂利嗪", "甲钴胺", "维生素B1",
    "维生素B12", "维生素C", "维生素D", "叶酸", "硫酸亚铁", "琥珀酸亚铁", "多糖铁", "钙片", "碳酸钙",
    "坦索罗辛", "非那雄胺", "西地那非", "他达拉非", "达泊西汀", "黄体酮", "地屈孕酮", "炔雌醇", "来曲唑",
    "氯米芬", "米非司酮", "缩宫素", "利多卡因", "苄星青霉素", "青霉素", "破伤风抗毒素",
)
DRUG_ENDINGS = ("霉素", "沙星", "西林", "他汀", "拉唑", "康唑", "硝唑", "地平", "普利", "沙坦", "替丁", "洛尔",
                "利嗪", "替尼", "单抗", "洛韦", "昔布", "洛芬", "米松", "尼松", "尼龙", "西泮", "唑仑", "西汀")
# a character before an ending that is not part of the name (吃/用/一种/类 ...)
NOT_NAME = set("吃用服涂抹擦滴喷加含打输换停种类些的和或及与等是个了要可先再点片粒支盒")
NUMBER_UNITS = ("毫克", "毫升", "微克", "小时", "分钟", "个月", "周岁", "公斤", "厘米", "毫米", "次", "片", "粒",
                "袋", "支", "滴", "克", "天", "日", "周", "月", "年", "岁", "瓶", "盒", "颗", "顿", "斤", "度",
                "倍", "mg", "ml", "g", "kg", "cm", "mm")


# Tags before a consultation turn, per side; either colon, with or without spaces ("患者：", "医生 :").
SPEAKER_TAGS = {"patient": ("患者", "病人", "家属"), "doctor": ("医生", "大夫")}


# ---------------------------------------------------------------- filters


def is_refusal(text: str) -> bool:
    low = text.lower()
    return any(p.lower() in low for p in REFUSALS)


def chinese_share(text: str) -> float:
    """Share of CJK characters among the letters (CJK + Latin) of a text; 0 when it has none."""
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in text)
    latin = sum(c.isascii() and c.isalpha() for c in text)
    return cjk / (cjk + latin) if cjk + latin else 0.0


def instruction_problem(text: str, min_chars: int = 6, max_chars: int = 200) -> str | None:
    """Why a generated instruction is not kept ('too short', ...), or None when it passes."""
    if len(text) < min_chars:
        return "too short"
    if len(text) > max_chars:
        return "too long"
    if chinese_share(text) < 0.6:
        return "not Chinese"
    if is_refusal(text):
        return "refusal"
    if any(w in text for w in MEDIA_WORDS):
        return "needs a picture or file"
    if not text[0].isalnum():
        return "starts with punctuation"
    return None


# ---------------------------------------------------------------- facts: drug names and numbers

_CN_DIGITS = {"零": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_CN_NUMBER = re.compile("([零一二两三四五六七八九十百半]+)(?=" + "|".join(NUMBER_UNITS) + ")")
_LIST_MARK = re.compile(r"(?m)^\s*[(（]?\d{1,2}\s*[.．、)）]\s*")
_ARABIC = re.compile(r"\d+(?:\.\d+)?")
_ENDING = re.compile("([\u4e00-\u9fff]?)(" + "|".join(DRUG_ENDINGS) + ")")


def chinese_number(s: str) -> float | None:
    """'三' -> 3, '十二' -> 12, '二十五' -> 25, '一百' -> 100, '半' -> 0.5; None for '两三' and the like."""
    if s == "半":
        return 0.5
    if re.fullmatch("[零一二两三四五六七八九]", s):
        return _CN_DIGITS[s]
    m = re.fullmatch("([一二两三四五六七八九])?百(?:零?([一二三四五六七八九]))?", s)
    if m:
        return 100 * _CN_DIGITS.get(m.group(1) or "一") + _CN_DIGITS.get(m.group(2) or "零")
    m = re.fullmatch("([二两三四五六七八九])?十([一二三四五六七八九])?", s)
    if m:
        return 10 * (_CN_DIGITS[m.group(1)] if m.group(1) else 1) + (_CN_DIGITS[m.group(2)] if m.group(2) else 0)
    return None


def numbers(text: str) -> set[str]:
    """The quantities a text states, as normalised numerals ('0.5', '3', '150').

    Full-width digits count as digits; a Chinese numeral before a unit (两片, 三天, 半年) counts as
    its value; list markers ('1.', '（2）' at a line start) are not quantities; and 1 is left out,
    since Chinese states it implicitly (一天两次 = 每天两次, 一次一片 = 每次1片)."""
    text = unicodedata.normalize("NFKC", text)
    text = _LIST_MARK.sub("", text)

    def arabic(m):
        value = chinese_number(m.group(1))
        return m.group(1) if value is None else f" {value:g} "
    text = _CN_NUMBER.sub(arabic, text)
    found = {f"{float(x):g}" for x in _ARABIC.findall(text)}
    found.discard("1")
    return found


def drug_terms(text: str) -> set[str]:
    """The drug names a text mentions: every DRUG_NAMES entry it contains, plus each typical
    generic-name ending (…霉素, …沙星, …他汀, …) with the character before it (红霉素 -> 红霉素,
    阿托伐他汀 -> 伐他汀; 换一种他汀 -> 他汀), which tells apart most names the list lacks."""
    found = {name for name in DRUG_NAMES if name in text}
    for m in _ENDING.finditer(text):
        before = m.group(1) if m.group(1) not in NOT_NAME else ""
        found.add(before + m.group(2))
    return found


def fact_check(original: str, rewrite: str) -> dict:
    """What a rewrite lost or added of the original's checkable facts (drug names and numbers):
    {"missing": [...], "added": [...]}, both empty when it kept them. A simple check by design: it
    does not read meaning, it only catches a dropped/invented drug or a changed dose or duration."""
    def diff(a: set, b: set) -> list:
        gone = a - b
        # one lost name is listed once: 西替利嗪, not also its ending 替利嗪
        return sorted(x for x in gone if not any(x != y and x in y for y in gone))

    drugs = drug_terms(original), drug_terms(rewrite)
    nums = numbers(original), numbers(rewrite)
    return {"missing": diff(drugs[0], drugs[1]) + sorted(nums[0] - nums[1], key=float),
            "added": diff(drugs[1], drugs[0]) + sorted(nums[1] - nums[0], key=float)}


# ---------------------------------------------------------------- consultation turns


def _tag(speaker: str) -> str:
    """A speaker's tag as models write it: 患者：, **医生**：, 【患者】：, 患者（张女士）："""
    return (r"[*【\[]*\s*(?:" + "|".join(SPEAKER_TAGS[speaker]) + r")\s*(?:[（(][^）)\n]{0,12}[）)])?\s*[*】\]]*"
            r"\s*[:：]")


def own_lines(text: str, speaker: str) -> str:
    """What `speaker` ("patient" or "doctor") says in a reply: a leading tag of its own dropped, and
    everything from the other side's tag on cut off (at a line's start, or after a sentence's end),
    since a model playing one side often goes on to write the whole dialogue.

        own_lines("病人：我头痛三天了。\n医生：你好，发烧吗？", "patient") == "我头痛三天了。"
    """
    other = "doctor" if speaker == "patient" else "patient"
    text = re.sub(r"^\s*" + _tag(speaker), "", text or "").strip()
    cut = re.search(r"(?:\n|(?<=[。！？!?…]))\s*" + _tag(other), text)
    return (text[:cut.start()] if cut else text).strip()
