"""The sample dataset's numbers, computed in plain Python from localws/sample_data/*.csv, never from the SQL under
test: what the offline Genie's answers must say. Orders that count are completed or shipped, as in
localws/answerer.py (cancelled and returned orders are left out)."""
import csv
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal

from helpers import ROOT

DATA = ROOT / "localws" / "sample_data"


def _read(name):
    with open(DATA / f"{name}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


CUSTOMERS = {r["customer_id"]: r for r in _read("customers")}
PRODUCTS = {r["product_id"]: r for r in _read("products")}
ORDERS = _read("orders")
FULFILLED = [o for o in ORDERS if o["status"] in ("completed", "shipped")]
CENT, TENTH = Decimal("0.01"), Decimal("0.1")


def key(order, dim):
    d = order["order_date"]
    return {"month": d[:7], "quarter": f"{d[:4]}-Q{(int(d[5:7]) + 2) // 3}", "year": d[:4],
            "region": CUSTOMERS[order["customer_id"]]["region"], "segment": CUSTOMERS[order["customer_id"]]["segment"],
            "customer": CUSTOMERS[order["customer_id"]]["name"], "category": PRODUCTS[order["product_id"]]["category"],
            "product": PRODUCTS[order["product_id"]]["name"]}[dim]


def measure(metric, orders):
    amounts = [Decimal(o["amount"]) for o in orders]
    return {"revenue": lambda: sum(amounts, Decimal("0.00")), "orders": lambda: len(orders),
            "quantity": lambda: sum(int(o["quantity"]) for o in orders),
            "customers": lambda: len({o["customer_id"] for o in orders}),
            "aov": lambda: (sum(amounts) / len(amounts)).quantize(CENT, ROUND_HALF_UP)}[metric]()


def in_year(year):
    """The orders that count, of `year` (None: all)."""
    return [o for o in FULFILLED if year is None or o["order_date"].startswith(f"{year}-")]


def grouped(metric, dim, year=None):
    groups = defaultdict(list)
    for o in in_year(year):
        groups[key(o, dim)].append(o)
    return {k: measure(metric, v) for k, v in groups.items()}


def top(groups):
    """(key, value) of the largest value."""
    return max(groups.items(), key=lambda item: item[1])


def pct(value, previous):
    return (Decimal(100) * (value - previous) / previous).quantize(TENTH, ROUND_HALF_UP)


def money(value):
    return f"${value:,.2f}"
