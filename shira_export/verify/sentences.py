"""A built-in set of real sentences for verification inputs (held out: none of them is in
the demo's training text, shira_export/demo_data.py, or the MiniLM example's,
examples/minilm_data.py).

48 sentences in 13 languages and 7 scripts, 3 to about 90 words: everyday speech, news,
technical prose, instructions, questions, numbers and punctuation, so that a tokenizer
produces what users feed (subwords, [UNK]s, byte fallbacks, long inputs). Written for this
project.
"""

from __future__ import annotations

__all__ = ["SENTENCES", "LANGUAGES"]

_BY_LANGUAGE: dict[str, tuple[str, ...]] = {
    "en": (
        "Please send me the invoice by Friday.",
        "Where is the nearest train station?",
        "The committee postponed its decision until the next quarterly meeting, citing incomplete data.",
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
        "My grandmother still writes letters by hand and mails them every Sunday.",
        "Restart the router, wait thirty seconds, then check whether the green light is on.",
        "The museum reopened after a two-year renovation that restored the original ceiling frescoes.",
        "Is it possible to change my seat to one next to the window?",
        "Version 2.4.1 fixes a memory leak in the connection pool and adds support for IPv6 addresses.",
        "When the library first opened in 1897, it held fewer than three thousand books, most of them "
        "donated by local families; today it lends more than a million items a year, runs reading "
        "programmes for children in six languages, and keeps a small archive of letters, maps and "
        "photographs that historians from across the region visit every summer to study how the town "
        "grew from a river crossing into a busy market city.",
        "Thanks!",
        "The patient reported mild headaches and was advised to drink more water and rest.",
    ),
    "de": (
        "Der Zug nach München hat heute zwanzig Minuten Verspätung.",
        "Könnten Sie mir bitte erklären, wie dieses Formular auszufüllen ist?",
        "Die Forscher veröffentlichten ihre Ergebnisse in einer angesehenen Fachzeitschrift.",
        "Wir treffen uns morgen um halb acht vor dem Kino.",
    ),
    "fr": (
        "Le musée est fermé le mardi et les jours fériés.",
        "Pourriez-vous m'indiquer le chemin vers la bibliothèque municipale ?",
        "La nouvelle loi entrera en vigueur au début de l'année prochaine, après une longue période de "
        "consultation publique.",
        "J'ai oublié mon parapluie dans le taxi hier soir.",
    ),
    "es": (
        "¿A qué hora abre la farmacia los domingos?",
        "El equipo de ingenieros terminó el puente dos meses antes de lo previsto.",
        "Mi hermana estudia medicina en Salamanca y quiere ser cirujana.",
        "Los precios de la vivienda han subido un ocho por ciento en el último año.",
    ),
    "it": (
        "Il treno per Firenze parte dal binario sette.",
        "Abbiamo visitato una piccola chiesa romanica sulle colline.",
        "Ricordati di spegnere la luce quando esci dall'ufficio.",
    ),
    "pt": (
        "O voo foi cancelado por causa de uma greve dos controladores.",
        "Você sabe onde posso comprar um carregador para este telefone?",
        "A biblioteca da universidade fica aberta até a meia-noite durante as provas.",
    ),
    "nl": (
        "De fietsenstalling bij het station is 's nachts gesloten.",
        "Kun je me helpen met het verplaatsen van deze kast?",
        "Het nieuwe ziekenhuis krijgt driehonderd bedden en een eigen helikopterplatform.",
    ),
    "pl": (
        "Czy ten autobus jedzie do centrum miasta?",
        "Wczoraj wieczorem oglądaliśmy stary film o podróży na Księżyc.",
    ),
    "ru": (
        "Сегодня библиотека работает до восьми часов вечера.",
        "Пожалуйста, закройте окно, в комнате стало холодно.",
        "Учёные обнаружили новый вид бабочек в горах Кавказа.",
    ),
    "zh": (
        "请问这附近有没有地铁站？",
        "这本书讲述了一个关于友谊和勇气的故事。",
        "我们明天上午九点在公司门口集合。",
    ),
    "ja": (
        "駅までの道を教えていただけますか。",
        "この美術館には江戸時代の浮世絵がたくさん展示されています。",
        "週末は家族と一緒に山へハイキングに行きました。",
    ),
    "ar": (
        "أين يمكنني شراء تذكرة القطار؟",
        "افتتحت المدينة مكتبة عامة جديدة في وسط السوق القديم.",
    ),
    "ko": (
        "오늘 오후에 회의실을 예약할 수 있을까요?",
        "이 식당은 매주 월요일에 문을 닫습니다.",
    ),
}

LANGUAGES: tuple[str, ...] = tuple(_BY_LANGUAGE)
# interleaved by language, so the first N sentences of the set are already mixed
SENTENCES: tuple[str, ...] = tuple(
    s
    for i in range(max(len(v) for v in _BY_LANGUAGE.values()))
    for v in _BY_LANGUAGE.values()
    if i < len(v)
    for s in (v[i],)
)
