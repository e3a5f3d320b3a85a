"""The offline Genie: answers questions over the sample dataset (schema `sample`, see sample.py).

`GenieAnswerer(dsn).answer(question, history)` answers the questions below with SQL it builds from fixed pieces
(no text of the question goes into SQL); given a `chat` client it asks that model for the SQL instead. Either SQL
runs read-only, time-limited, and logged in as the reader role of sample.py, which can read schema `sample` and
nothing else. A question it can't answer raises `CannotAnswer`, whose message says what it can answer. Nothing
here is a real Genie.

Question shapes it answers (orders 2024-01-01 .. 2025-12-31; cancelled and returned
orders are left out; metrics: revenue (or sales), orders, units, customers, average order value):
- totals: "total revenue in 2025", "how many orders?", "how many customers in 2024?", "average order value"
- top-N: "top 5 products by revenue", "top 3 customers by orders in 2025", "which region has the most
  sales?", "best-selling categories", "which month had the lowest revenue?"
- breakdowns by month / quarter / year / region / segment / category / product / customer:
  "revenue by month in 2025", "orders per quarter", "monthly sales", "customers by segment"
- growth: "revenue growth year over year", "month-over-month order growth in 2025", "2025 vs 2024 sales",
  "which region grew fastest?", "revenue growth by category"
- follow-ups in the same conversation reuse the previous question: "and by month?", "what about 2024?",
  "and orders?", "for all years?"
The only filter is a year. A question that narrows to anything else (a month or quarter, a region, segment or
category, a status, "last year") is refused, not answered for all the data; so is one with a word no rule
understands ("median", "churned", "new customers"), rather than answered as another question. A refusal is short.
"""
import logging
import re
from dataclasses import dataclass, field, replace
from datetime import date

import psycopg

from localws.sample import SCHEMA, reader_login

log = logging.getLogger(__name__)

MAX_ROWS = 5000  # Genie's row limit
YEARS = (2024, 2025)
HELP = ("I answer totals, top-N, breakdowns (by month, quarter, year, region, segment, category, product or "
        "customer) and growth of revenue, orders, units, customers or average order value in 2024-2025, e.g. "
        "\"top 5 products by revenue\", \"revenue by month in 2025\", \"revenue growth year over year\", and "
        "follow-ups like \"what about 2024?\"")
# Postgres type oid -> Databricks ColumnInfoTypeName
TYPES = {16: "BOOLEAN", 20: "LONG", 21: "INT", 23: "INT", 700: "DOUBLE", 701: "DOUBLE", 1700: "DECIMAL",
         1082: "DATE", 1114: "TIMESTAMP", 1184: "TIMESTAMP"}


class CannotAnswer(Exception):
    """The question is outside what this answerer can do; the message says what it can do."""


@dataclass
class GenieResult:
    text: str  # one sentence with the headline number
    sql: str  # as run, values inlined for reading
    columns: list = field(default_factory=list)  # [{"name", "type_name"}]
    rows: list = field(default_factory=list)  # [[str | None]], like Databricks JSON_ARRAY results
    truncated: bool = False  # more than MAX_ROWS rows


FULFILLED = "o.status in ('completed', 'shipped')"
METRICS = {  # key: (aggregate, with {f} for a FILTER clause; column; label; money?; words that ask for it)
    "aov": ("round(avg(o.amount){f}, 2)", "avg_order_value", "average order value", True,
            r"average order|avg order|aov|order value|basket size"),
    "quantity": ("sum(o.quantity){f}", "units", "units sold", False, r"units?|quantity|quantities|items|sold|volume"),
    "customers": ("count(distinct o.customer_id){f}", "customers", "active customers", False,
                  r"customers?|buyers|clients"),
    "orders": ("count(*){f}", "orders", "orders", False, r"orders?|purchases|transactions"),
    "revenue": ("sum(o.amount){f}", "revenue", "revenue", True,
                r"revenue|sales|income|turnover|money|earn(?:ed|ings)?|amount|spend|spent|gmv"),
}
DIMS = {  # key: (expression, column, table it needs, words)
    "month": ("to_char(o.order_date, 'YYYY-MM')", "month", "", r"months?|monthly"),
    "quarter": ("to_char(o.order_date, 'YYYY-\"Q\"Q')", "quarter", "", r"quarters?|quarterly"),
    "year": ("extract(year from o.order_date)::int", "year", "", r"years?|yearly|annual(?:ly)?"),
    "region": ("c.region", "region", "c", r"regions?|regional"),
    "segment": ("c.segment", "segment", "c", r"segments?"),
    "category": ("p.category", "category", "p", r"categor(?:y|ies)"),
    "product": ("p.name", "product", "p", r"products?"),
    "customer": ("c.name", "customer", "c", r"customers?"),
}
JOINS = {"c": "\njoin sample.customers c on c.customer_id = o.customer_id",
         "p": "\njoin sample.products p on p.product_id = o.product_id"}
ENTITY = "|".join(d[3] for d in DIMS.values())
NUMBERS = {w: i for i, w in enumerate("one two three four five six seven eight nine ten".split(), 1)}
TOP = re.compile(rf"\b(?:top|bottom|best|worst|biggest|largest|smallest|leading|(?:most|least) popular)"
                 rf"(?:[- ]selling)?\s+(\d+|{'|'.join(NUMBERS)})?\s*({ENTITY})\b|\b(?:which|what)\s+({ENTITY})\b"
                 rf"|\b({ENTITY})\s+with\s+the\s+(?:most|highest|lowest|fewest|least|biggest)"
                 rf"|\b(?:fastest|slowest)[- ]growing\s+({ENTITY})\b")
BY = re.compile(rf"\b(?:by|per|each|every|across|split by|broken down by)\s+(?:the\s+)?({ENTITY})\b"
                r"|\b(monthly|quarterly|yearly|annual|annually)\b")
GROWTH = re.compile(r"\b(?:grow|grew|grown|growth|growing|increased?|decreased?|declined?|changed?|trends?|"
                    r"compared?|comparison|vs\.?|versus|yoy|mom)\b|(?:year|month)[- ](?:over|on)[- ](?:year|month)")
UNSUPPORTED = re.compile(  # filters the rules can't apply: refuse rather than answer another question
    r"\b(?:january|february|march|april|june|july|august|september|october|november|december|q[1-4]|"
    r"(?:last|this|previous|next|past) (?:year|quarter|month|week)|cancel\w*|returned|returns|shipped|"
    r"sign(?:ed)?[- ]?ups?|(?:north|south)?(?:east|west)|midwest|consumers?|small business|enterprises?|"
    r"electronics|home|office|outdoor|apparel)\b")
FILLER = set("""a about all also an and any anything are as at be been bought buy by can could data dataset did do does
each ever every for from get give got had has have hello hey hi how i in is it its list made make many me much my
number of on only our over overall please show so something sum tell than thanks that the their there these those to
total totals us was we were what which who with would you just now then same but""".split())  # no change of meaning
CONCEPTS = re.compile("|".join([r"\ba(?:verage|vg) order value\b"]  # the words the rules understand
                                + [rf"\b(?:{spec[4]})\b" for spec in METRICS.values()]
                                + [rf"\b(?:{spec[3]})\b" for spec in DIMS.values()] + [
    r"\b(?:top|bottom|best|worst|biggest|largest|smallest|leading|most|least|popular|selling|highest|lowest|greatest|"
    r"fewest|fastest|slowest|growing|each|split|broken|down|across|per|time|" + "|".join(NUMBERS) + r")\b"]))
ASCENDING = re.compile(r"\b(?:bottom|worst|lowest|least|smallest|fewest|slowest)\b")
FOLLOW_UP = re.compile(r"^\W*(?:and|what about|how about|same|now|also|then|only|just|but|for)\b")


@dataclass(frozen=True)
class Ask:
    """What a question asks for; None = not said (a follow-up takes it from the previous question)."""
    metric: str | None = None
    dim: str | None = None  # breakdown or top-N dimension
    top: int | None = None
    growth: str | None = None  # "yoy" | "mom"
    year: int | None = None  # 0 = all years, said explicitly
    ascending: bool = False


def _dim(word):
    return next(k for k, d in DIMS.items() if re.fullmatch(d[3], word))


def parse(question: str) -> Ask:
    """The Ask of one question on its own (see the module docstring for the shapes)."""
    text = " " + question.lower().replace("’", "'") + " "
    text = re.sub(r"\b(?:product|customer)s? (categor(?:y|ies)|segments?|regions?)\b", r"\1", text)
    ascending = bool(ASCENDING.search(text))
    years = [int(y) for y in re.findall(r"\b(20\d\d)\b", text)]
    year = max(years) if years else 0 if re.search(r"\ball[- ](?:years|time)|\boverall\b", text) else None
    growth = "yoy" if GROWTH.search(text) or len(set(years)) > 1 else None
    dim = top = None
    if m := TOP.search(text):
        word = next(g for g in m.groups()[1:] if g)
        dim, number = _dim(word), m.group(1)
        plural = word.endswith("s") and not word.endswith("ss")
        top = int(NUMBERS.get(number, number or 0)) or (5 if plural else 1)
        text = text[:m.start()] + " " + text[m.end():]
        if "selling" in m.group(0):
            text += " units"
        if "popular" in m.group(0):
            text += " orders"
    elif m := BY.search(text):
        word = m.group(1) or {"monthly": "month", "quarterly": "quarter"}.get(m.group(2), "year")
        dim = _dim(word)
        text = text[:m.start()] + " " + text[m.end():]
    found = [(m.start(), i, key) for i, (key, spec) in enumerate(METRICS.items())
             if (m := re.search(rf"\b(?:{spec[4]})\b", text))]
    metric = min(found)[2] if found else None
    if growth and (dim == "month" or re.search(r"month[- ](?:over|on)[- ]month|\bmom\b", text)):
        growth, dim, top = "mom", None, None
    elif growth and dim in ("year", "quarter"):
        dim, top = None, None
    return Ask(metric, dim, top, growth, year, ascending)


def unknown_words(question: str) -> list[str]:
    """The words of `question` that no rule understands and that might change its meaning ("median", "churned",
    "new"): answering without them would answer another question."""
    text = question.lower().replace("’", "'")
    for pattern in (CONCEPTS, GROWTH, FOLLOW_UP, re.compile(r"\b20\d\d\b|\d+|'s\b|'re\b")):
        text = pattern.sub(" ", text)
    return [word for word in re.findall(r"[a-z]+(?:'[a-z]+)?", text) if word not in FILLER]


def resolve(question: str, history=()) -> Ask:
    """The Ask of `question` in its conversation: a follow-up takes what it leaves out from the previous one."""
    if m := UNSUPPORTED.search(question.lower()):
        raise CannotAnswer(f"I can't narrow the data to {m.group(0)!r}: the only filter I apply is a year. {HELP}")
    if unknown := unknown_words(question):
        raise CannotAnswer(f"I can't answer {question!r} as asked: I don't know what {' '.join(unknown)!r} means "
                           f"here, and answering another question instead would mislead. {HELP}")
    ask = parse(question)
    earlier = [h if isinstance(h, str) else h.get("question") or "" for h in history]
    said = ask != Ask(ascending=ask.ascending)  # something recognised, to follow up with
    if said and earlier and (ask.metric is None or FOLLOW_UP.search(question.lower())):
        prev = resolve(earlier[-1], earlier[:-1])
        shape = ask if (ask.dim or ask.growth) else prev
        ask = Ask(ask.metric or prev.metric, shape.dim, shape.top, shape.growth,
                  prev.year if ask.year is None else ask.year, shape.ascending)
    if ask.metric is None and not (ask.dim or ask.growth):
        raise CannotAnswer(f"I don't know how to answer {question!r}. {HELP}")
    return replace(ask, metric=ask.metric or "revenue", year=ask.year or None)


def build(ask: Ask) -> tuple[str, list]:
    """SQL and parameters for an Ask, from the constant pieces above only."""
    agg, col = METRICS[ask.metric][:2]
    expr, dcol, table, _ = DIMS[ask.dim or "year"]
    source = "from sample.orders o" + JOINS.get(table, "")
    inner = source.replace("\n", "\n  ")  # inside a WITH
    where, params = f"where {FULFILLED}", []
    if ask.growth == "yoy" and ask.dim:  # per dimension: this year against the one before
        y = ask.year or YEARS[-1]
        sql = (f"with t as (\n  select {expr} as {dcol},\n"
               f"    {agg.format(f=' filter (where o.order_date < %s)')} as previous,\n"
               f"    {agg.format(f=' filter (where o.order_date >= %s)')} as value\n  {inner}\n"
               f"  {where} and o.order_date >= %s and o.order_date < %s\n  group by 1)\n"
               f"select {dcol}, previous as {col}_{y - 1}, value as {col}_{y},\n"
               f"  round(100.0 * (value - previous) / nullif(previous, 0), 1) as growth_pct\nfrom t\n"
               f"order by growth_pct {'asc' if ask.ascending else 'desc'} nulls last, 1")
        params = [date(y, 1, 1), date(y, 1, 1), date(y - 1, 1, 1), date(y + 1, 1, 1)]
    elif ask.growth:  # over time: each period against the one before, the filter applied after lag()
        expr, dcol = DIMS["month" if ask.growth == "mom" else "year"][:2]
        sql = (f"with t as (\n  select {expr} as {dcol}, {agg.format(f='')} as value\n  {inner}\n  {where}\n"
               f"  group by 1),\ng as (select {dcol}, value, lag(value) over (order by {dcol}) as previous from t)\n"
               f"select {dcol}, value as {col}, previous as previous_{col},\n"
               f"  round(100.0 * (value - previous) / nullif(previous, 0), 1) as growth_pct\nfrom g")
        if ask.year:
            sql, params = sql + f"\nwhere left({dcol}::text, 4) = %s", [str(ask.year)]
        sql += "\norder by 1"
    else:
        if ask.year:
            where, params = where + " and o.order_date >= %s and o.order_date < %s", [
                date(ask.year, 1, 1), date(ask.year + 1, 1, 1)]
        if not ask.dim:
            return f"select {agg.format(f='')} as {col}\n{source}\n{where}", params
        order = "1" if ask.dim in ("month", "quarter", "year") and not ask.top else \
            f"2 {'asc' if ask.ascending else 'desc'}, 1"
        sql = f"select {expr} as {dcol}, {agg.format(f='')} as {col}\n{source}\n{where}\ngroup by 1\norder by {order}"
    if ask.top:
        sql, params = sql + "\nlimit %s", params + [ask.top]
    return sql, params


def headline(ask: Ask, rows) -> str:
    """One sentence with the headline number of a result."""
    _, _, label, money, _ = METRICS[ask.metric]
    fmt = (lambda v: f"${v:,.2f}") if money else (lambda v: f"{v:,}")
    scope = f" in {ask.year}" if ask.year else f" in {YEARS[0]}-{YEARS[-1]}"
    if not rows or rows[0][-1] is None and len(rows) == 1 and not ask.growth:
        return f"There is no data{scope}: the orders run from {YEARS[0]}-01-01 to {YEARS[-1]}-12-31."
    if ask.growth and ask.dim:  # rows come sorted by growth, in the direction asked
        key, prev, value, pct = rows[0]
        y = ask.year or YEARS[-1]
        if pct is None:
            return f"There is no {label} in {y - 1} to compare {y} with."
        return (f"By {ask.dim}, {label} grew {'slowest' if ask.ascending else 'fastest'} for {key}: {pct}% "
                f"from {fmt(prev)} in {y - 1} to {fmt(value)} in {y}.")
    if ask.growth:
        period, value, prev, pct = rows[-1]
        unit = "month" if ask.growth == "mom" else "year"
        if prev is None:
            return f"{label.capitalize()} in {period}: {fmt(value)}; there is no earlier {unit} to compare."
        return (f"{label.capitalize()} in {period}: {fmt(value)}, {'up' if pct >= 0 else 'down'} "
                f"{abs(pct)}% from {fmt(prev)} the {unit} before.")
    if not ask.dim:
        return f"{'Average order value' if ask.metric == 'aov' else 'Total ' + label}{scope}: " \
               f"{fmt(rows[0][0])}."
    key, value = rows[0]
    if ask.top == 1:
        return f"The {ask.dim} with the {'lowest' if ask.ascending else 'highest'} {label}{scope} is {key}, " \
               f"with {fmt(value)}."
    if ask.top:
        plural = ask.dim[:-1] + "ies" if ask.dim.endswith("y") else ask.dim + "s"
        return (f"{'Bottom' if ask.ascending else 'Top'} {len(rows)} {plural} by {label}{scope}: {key} "
                f"{'trails' if ask.ascending else 'leads'} with {fmt(value)}.")
    best = min(rows, key=lambda r: r[1]) if ask.ascending else max(rows, key=lambda r: r[1] or 0)
    return f"{label.capitalize()} by {ask.dim}{scope}: {len(rows)} rows; the " \
           f"{'lowest' if ask.ascending else 'highest'} is {best[0]} with {fmt(best[1])}."


def _cell(value):
    return None if value is None else str(value).lower() if isinstance(value, bool) else str(value)


class GenieAnswerer:
    """Answers Genie questions over schema `sample`: by fixed rules, or with SQL written by `chat` if given."""

    def __init__(self, dsn: str, chat=None, *, login: dict | None = None, timeout_ms: int = 10_000,
                 max_rows: int = MAX_ROWS):
        """`login`: the reader role's, from `sample.reader_login` ({}: the DSN's own role); by default set up with
        `dsn` on the first question."""
        self.dsn, self.chat, self.timeout_ms, self.max_rows = dsn, chat, timeout_ms, max_rows
        self._login = login

    def answer(self, question: str, history=()) -> GenieResult:
        """history: the earlier questions of the conversation (strings, or dicts with "question")."""
        if self.chat is not None:
            return self._answer_with_model(question, history)
        ask = resolve(question, history)
        log.debug("question %r -> %s", question, ask)
        sql, params = build(ask)
        result, raw = self.run(sql, params)
        result.text = headline(ask, raw)
        return result

    def run(self, query: str, params=None) -> tuple[GenieResult, list]:
        """Run one query as the reader role, read-only, with a timeout; a server-side cursor fetches at most
        max_rows + 1 rows. (DECLARE ... CURSOR also refuses anything but a SELECT or VALUES.)"""
        if self._login is None:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                self._login = reader_login(conn) or {}
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10, **self._login) as conn, \
                conn.transaction():
            conn.execute("set transaction read only")
            conn.execute("select set_config('statement_timeout', %s, true), "
                         "set_config('search_path', 'sample', true)", [str(self.timeout_ms)])
            shown = psycopg.ClientCursor(conn).mogrify(query, params) if params else query
            with conn.cursor(name="genie") as cur:
                cur.execute(query, params or None)
                raw = cur.fetchmany(self.max_rows + 1)
                columns = [{"name": c.name, "type_name": TYPES.get(c.type_code, "STRING")} for c in cur.description]
        rows = [[_cell(v) for v in row] for row in raw[:self.max_rows]]
        return GenieResult("", shown, columns, rows, len(raw) > self.max_rows), raw[:self.max_rows]

    def _answer_with_model(self, question, history):
        earlier = [h if isinstance(h, str) else f"{h.get('question')}\n  (SQL: {h.get('sql')})" for h in history]
        prompt = "\n".join(["Earlier questions in this conversation:", *(f"- {q}" for q in earlier), ""]
                           if earlier else []) + f"Question: {question}"
        reply = self.chat.complete([{"role": "system", "content": SQL_PROMPT}, {"role": "user", "content": prompt}],
                                   temperature=0)
        query = extract_select(reply.get("content") or "")
        try:
            result, raw = self.run(query)
        except psycopg.errors.QueryCanceled as e:
            raise CannotAnswer(f"the query took longer than {self.timeout_ms} ms and was stopped: {e}") from e
        except psycopg.Error as e:
            if isinstance(e, psycopg.OperationalError) and e.sqlstate is None:
                raise  # the database is unreachable: not the question's fault
            raise CannotAnswer(f"the query failed: {e.diag.message_primary or e}") from e
        count = f"{len(result.rows):,} rows" + (f" (the first {self.max_rows:,})" if result.truncated else "")
        value = f": {raw[0][0]}" if len(raw) == 1 and len(raw[0]) == 1 else ""
        result.text = f"Answered {question!r} with one query, {count}{value}."
        return result


SQL_PROMPT = f"""You write one PostgreSQL SELECT query that answers the user's question over this schema:

{SCHEMA}

Revenue is sum(amount) over orders with status in ('completed', 'shipped'); count orders the same way.
Qualify tables with the schema (sample.orders). Reply with the SQL only: one SELECT (or WITH ... SELECT)
statement, no explanation. If the question is a follow-up, reuse the earlier question's meaning."""


def extract_select(text: str) -> str:
    """The single SELECT/WITH statement in a model reply (code fences and a final ';' removed), or CannotAnswer."""
    fenced = re.search(r"```[a-zA-Z]*\s*(.*?)```", text, re.S)
    query = (fenced.group(1) if fenced else text).strip()
    query = re.sub(r"^(?:\s*--[^\n]*\n)+", "", query).strip().rstrip(";").strip()
    if not re.match(r"(?i)(select|with)\b", query) or ";" in query:
        raise CannotAnswer(f"the model did not write a single SELECT statement: {text[:300]!r}")
    return query


