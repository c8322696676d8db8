# ruff: noqa: RUF001 - text in other scripts is the point here
"""Raw material for the stand-in's replies: prose, code and text in other scripts.

Written for this project. The code snippets deliberately contain `<`, `>` and `&`, so
every test that streams a reply also exercises Go's HTML escaping of JSON strings.
"""

from __future__ import annotations

from typing import Final

__all__ = ["CODE_SNIPPETS", "LIST_ITEMS", "OPENERS", "OTHER_SCRIPTS", "PROSE"]

OPENERS: Final = (
    "Sure, here is a short overview.",
    "Good question.",
    "Let me walk through it step by step.",
    "Here is what I would suggest.",
    "In short: it depends on the constraints.",
    "There are a few things worth separating here.",
    "Happy to help with that.",
    "That is a common source of confusion.",
)

PROSE: Final = (
    "A gateway sits between clients and the model server and decides which requests go on.",
    "Rate limits protect the shared hardware from a single noisy tenant.",
    "Streaming responses arrive token by token, so the first words show up quickly.",
    "A budget counts tokens over a day or a month and refuses work once it is spent.",
    "Most latency comes from the first token; after that the pace is steady.",
    "Logs should carry a request id so one request can be followed across services.",
    "Caching a key's record for a second keeps the database out of the hot path.",
    "An estimate is fine for admission as long as the real usage is settled later.",
    "The river froze early that year, and the ferry stayed in the harbour until March.",
    "Bread dough needs time more than it needs strength; let it rest between folds.",
    "The old lighthouse keeper wrote the weather in the same notebook for forty years.",
    "Tomatoes ripen faster next to bananas because of the ethylene they release.",
    "A good map leaves things out on purpose so the important roads stand out.",
    "Migratory birds use the stars, the sun and the Earth's magnetic field to navigate.",
    "The library reopened after the flood with fewer books and many more volunteers.",
    "Compound interest rewards patience more than it rewards clever timing.",
    "When two clocks disagree, you learn something only if you know which one drifts.",
    "Small tests that run in seconds get run; slow ones get skipped and then forgotten.",
    "Every retry needs a limit, or a brief outage turns into a long one.",
    "Timeouts belong on both sides of a connection, each with its own reason.",
    "A queue smooths bursts, but it cannot make a slow consumer fast.",
    "The simplest schema that answers today's questions is usually the right start.",
    "Backups are only real once a restore has been tried.",
    "Idempotent operations make retries safe, which makes failures boring.",
    "Measure twice before optimising; the slow part is rarely where it seems.",
    "The mountain path splits at the spring, and the left fork is shorter but steeper.",
    "Tea brewed too hot turns bitter, while coffee brewed too cool tastes sour.",
    "Octopuses can taste with their arms, which are lined with chemical receptors.",
    "The orchestra tuned to the oboe, as orchestras have done for centuries.",
    "A sentence that needs a second reading usually needs a second draft.",
    "Clear error messages save more support time than any dashboard.",
    "Secrets belong in the environment or a vault, never in the repository.",
    "Monotonic clocks measure durations; wall clocks tell people what time it is.",
    "Percentiles describe latency better than averages, which hide the slow tail.",
    "Back-pressure tells a producer to slow down before memory runs out.",
    "A feature flag lets you ship code before you ship behaviour.",
)

LIST_ITEMS: Final = (
    "check the configuration first",
    "reproduce the problem with the smallest input",
    "read the error message twice",
    "write the failing test before the fix",
    "keep the change small enough to review",
    "measure before and after",
    "note what you tried and what happened",
    "ask someone to look at it with fresh eyes",
)

CODE_SNIPPETS: Final = (
    (
        "python",
        "def clamp(value, low, high):\n"
        '    """Keep value within [low, high]."""\n'
        "    if low > high:\n"
        '        raise ValueError("low > high")\n'
        "    return max(low, min(value, high))",
    ),
    (
        "python",
        "async def fetch_all(client, urls):\n"
        "    results = []\n"
        "    for url in urls:\n"
        "        response = await client.get(url)\n"
        "        if response.status_code >= 400 and response.status_code != 404:\n"
        "            response.raise_for_status()\n"
        "        results.append(response.json())\n"
        "    return results",
    ),
    (
        "javascript",
        "const visible = items\n"
        "  .filter((item) => item.score > 0.5 && !item.hidden)\n"
        "  .map((item) => `<li>${item.title}</li>`)\n"
        "  .join('');",
    ),
    (
        "sql",
        "SELECT tenant_id, SUM(tokens) AS used\n"
        "FROM usage_ledger\n"
        "WHERE day >= CURRENT_DATE - 7 AND tokens > 0\n"
        "GROUP BY tenant_id\n"
        "ORDER BY used DESC;",
    ),
    (
        "bash",
        "for f in logs/*.json; do\n  jq -r '.status' \"$f\" >> statuses.txt 2>&1 &\ndone\nwait",
    ),
    (
        "html",
        '<form method="post" action="/login">\n'
        '  <input name="user" autocomplete="username">\n'
        '  <button type="submit">Sign in &rarr;</button>\n'
        "</form>",
    ),
    (
        "go",
        "func retry(n int, f func() error) (err error) {\n"
        "\tfor i := 0; i < n; i++ {\n"
        "\t\tif err = f(); err == nil {\n"
        "\t\t\treturn nil\n"
        "\t\t}\n"
        "\t}\n"
        "\treturn err\n"
        "}",
    ),
    (
        "rust",
        "fn mean(xs: &[f64]) -> Option<f64> {\n"
        "    if xs.is_empty() { return None; }\n"
        "    Some(xs.iter().sum::<f64>() / xs.len() as f64)\n"
        "}",
    ),
)

OTHER_SCRIPTS: Final = (
    "東京の朝は静かで、駅のホームには通勤客が整然と並んでいます。",
    "この方法なら、設定を変えずに問題を再現できます。",
    "我们先检查配置文件，然后再重新启动服务。",
    "长江是中国最长的河流，全长约六千三百公里。",
    "오늘은 날씨가 맑아서 산책하기 좋은 날입니다.",
    "Москва стоит на семи холмах, как и Рим.",
    "Проверьте журнал ошибок, прежде чем перезапускать сервер.",
    "Η θάλασσα ήταν ήρεμη και το πλοίο έφτασε νωρίς στο λιμάνι.",
    "المكتبة مفتوحة كل يوم من الثامنة صباحًا حتى المساء.",
    "हम कल सुबह जल्दी निकलेंगे ताकि भीड़ से बच सकें।",
    "Ça marche très bien, même avec des caractères accentués comme é, è et ç.",
    "Größe und Gewicht müssen übereinstimmen, sonst schlägt die Prüfung fehl.",
    "Deployment finished 🚀 — all checks green ✅",
    "Temperature ≈ 21 °C, humidity ≤ 40 %, wind → north-east.",
)
