"""Make the sample dataset the local workspace loads into Postgres schema `sample` (see localws/sample.py).

    python localws/sample_data/generate.py [OUT_DIR]     # default: the folder of this script

A small online shop over two full years (2024-01-01 .. 2025-12-31): customers, products and orders, with
growth (more customers and orders in 2025), seasonality (a November-December peak, outdoor gear in summer)
and realistic statuses. Seeded and built from `random.Random.random()` alone, money in `Decimal`, so the
same script writes byte-identical CSVs on every run and Python version.
"""
import csv
import math
import random
import sys
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

SEED = 20240101
FIRST_DAY, LAST_DAY = date(2024, 1, 1), date(2025, 12, 31)
CUSTOMERS = 400
ORDERS_PER_DAY = 3.8  # at the start; grows linearly to x1.8 by the end
SEASON = [0.8, 0.78, 0.9, 0.95, 1.0, 1.05, 1.0, 0.95, 1.0, 1.05, 1.35, 1.6]  # January .. December
REGIONS = [("Northeast", 0.26), ("Southeast", 0.22), ("Midwest", 0.18), ("Southwest", 0.14), ("West", 0.20)]
SEGMENTS = [("Consumer", 0.6, (1, 3), Decimal("0")), ("Small Business", 0.28, (1, 6), Decimal("0.05")),
            ("Enterprise", 0.12, (2, 12), Decimal("0.10"))]  # share, quantity range, discount
FIRST = ["Ava", "Liam", "Maria", "Noah", "Olivia", "Ethan", "Sofia", "Lucas", "Mia", "James", "Amara", "Kenji",
         "Priya", "Mateo", "Chloe", "Omar", "Hannah", "Diego", "Grace", "Arjun", "Elena", "Samuel", "Zoe", "Yusuf"]
LAST = ["Garcia", "Smith", "Nguyen", "Johnson", "Patel", "Brown", "Kim", "Lopez", "Miller", "Chen", "Davis",
        "Wilson", "Okafor", "Moore", "Rossi", "Taylor", "Silva", "Clark", "Haddad", "Lewis", "Walker", "Young"]
COMPANY = ["Labs", "Logistics", "Foods", "Studio", "Partners", "Systems", "Outfitters", "Holdings", "Works",
           "Supply", "Design", "Consulting"]
PRODUCTS = {  # category: [(name, unit price, popularity)]
    "Electronics": [("Wireless Earbuds", "59.99", 5), ("Bluetooth Speaker", "79.00", 3), ("4K Monitor", "329.00", 2),
                    ("USB-C Hub", "39.50", 4), ("Mechanical Keyboard", "119.00", 2),
                    ("Noise-Cancelling Headphones", "249.00", 3), ("HD Webcam", "69.99", 2),
                    ("Portable SSD 1TB", "109.00", 2)],
    "Home": [("Ceramic Mug Set", "24.00", 4), ("Cast Iron Skillet", "45.00", 3), ("Linen Bedsheets", "89.00", 2),
             ("Air Purifier", "189.00", 2), ("Desk Lamp", "34.99", 3), ("Throw Blanket", "49.00", 3),
             ("Chef's Knife", "79.00", 2), ("Coffee Grinder", "65.00", 2)],
    "Office": [("Ergonomic Chair", "399.00", 2), ("Standing Desk", "549.00", 1), ("Notebook 3-Pack", "14.99", 5),
               ("Gel Pens 12-Pack", "9.99", 5), ("Desk Organizer", "27.50", 3), ("Whiteboard", "59.00", 2),
               ("Label Printer", "99.00", 1), ("Paper Shredder", "139.00", 1)],
    "Outdoor": [("Camping Tent", "229.00", 2), ("Hiking Backpack", "129.00", 3), ("Insulated Water Bottle", "32.00", 5),
                ("Folding Chair", "44.00", 3), ("Trekking Poles", "69.00", 2), ("Sleeping Bag", "149.00", 2),
                ("Headlamp", "29.99", 3), ("Cooler Box", "179.00", 1)],
    "Apparel": [("Rain Jacket", "139.00", 3), ("Merino T-Shirt", "59.00", 4), ("Running Shoes", "119.00", 3),
                ("Wool Socks 3-Pack", "24.00", 5), ("Fleece Hoodie", "74.00", 3), ("Baseball Cap", "22.00", 3),
                ("Leather Belt", "39.00", 2), ("Winter Gloves", "35.00", 2)],
}
BOOST = {"Outdoor": {5: 1.8, 6: 2.2, 7: 2.2, 8: 1.6}, "Electronics": {11: 1.7, 12: 2.0}, "Apparel": {10: 1.3, 11: 1.4}}


class Rng:
    """Only `random()` of a seeded generator, whose sequence Python keeps stable across versions."""

    def __init__(self, seed):
        self.r = random.Random(seed)

    def below(self, n):
        return min(int(self.r.random() * n), n - 1)

    def between(self, lo, hi):
        return lo + self.below(hi - lo + 1)

    def weighted(self, items, weights):
        x, total = self.r.random() * sum(weights), 0.0
        for item, w in zip(items, weights):
            total += w
            if x < total:
                return item
        return items[-1]

    def poisson(self, lam):
        limit, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= self.r.random()
            if p <= limit:
                return k
            k += 1


def customers(rng):
    rows, names = [], set()
    span = (date(2025, 10, 31) - date(2023, 1, 1)).days
    for cid in range(1, CUSTOMERS + 1):
        segment = rng.weighted(SEGMENTS, [s[1] for s in SEGMENTS])[0]
        while True:
            last = LAST[rng.below(len(LAST))]
            name = (f"{FIRST[rng.below(len(FIRST))]} {last}" if segment == "Consumer"
                    else f"{last} {COMPANY[rng.below(len(COMPANY))]}")
            if name not in names:
                break
        names.add(name)
        region = rng.weighted([r for r, _ in REGIONS], [w for _, w in REGIONS])
        signup = date(2023, 1, 1) + timedelta(days=int(span * rng.r.random() ** 0.75))  # more signups later
        rows.append({"customer_id": cid, "name": name, "region": region, "segment": segment, "signup_date": signup})
    return rows


def products():
    rows, pid = [], 0
    for category, items in PRODUCTS.items():
        for name, price, popularity in items:
            pid += 1
            rows.append({"product_id": pid, "name": name, "category": category, "unit_price": Decimal(price),
                         "popularity": popularity})
    return rows


def order(rng, day, customer, product, status=None):
    _, _, (lo, hi), discount = next(s for s in SEGMENTS if s[0] == customer["segment"])
    quantity = rng.between(lo, hi)
    amount = (quantity * product["unit_price"] * (1 - discount)).quantize(Decimal("0.01"), ROUND_HALF_UP)
    if status is None:
        x = rng.r.random()
        recent = (LAST_DAY - day).days < 10
        status = "cancelled" if x < 0.04 else "returned" if x < 0.07 else "shipped" if recent else "completed"
    return {"customer_id": customer["customer_id"], "product_id": product["product_id"], "order_date": day,
            "quantity": quantity, "amount": amount, "status": status}


def pick_product(rng, prods, month):
    weights = [p["popularity"] * BOOST.get(p["category"], {}).get(month, 1.0) for p in prods]
    return rng.weighted(prods, weights)


def orders(rng, custs, prods):
    rows = []
    for c in custs:  # a new customer's first order, within two weeks of signing up
        if c["signup_date"] >= FIRST_DAY:
            day = min(c["signup_date"] + timedelta(days=rng.between(0, 14)), LAST_DAY)
            rows.append(order(rng, day, c, pick_product(rng, prods, day.month), status="completed"))
    days = (LAST_DAY - FIRST_DAY).days
    for i in range(days + 1):
        day = FIRST_DAY + timedelta(days=i)
        weekend = 1.15 if day.weekday() >= 5 else 1.0
        lam = ORDERS_PER_DAY * (1 + 0.8 * i / days) * SEASON[day.month - 1] * weekend
        active = [c for c in custs if c["signup_date"] <= day]
        weights = [3.0 if c["segment"] == "Enterprise" else 1.5 if c["segment"] == "Small Business" else 1.0
                   for c in active]
        for _ in range(rng.poisson(lam)):
            rows.append(order(rng, day, rng.weighted(active, weights), pick_product(rng, prods, day.month)))
    buyers = {r["customer_id"] for r in rows if r["status"] == "completed"}
    for c in custs:  # everyone bought at least once, so "how many customers" counts them all
        if c["customer_id"] not in buyers:
            day = max(c["signup_date"], FIRST_DAY) + timedelta(days=rng.between(15, 200))
            rows.append(order(rng, day, c, pick_product(rng, prods, day.month), status="completed"))
    rows.sort(key=lambda r: (r["order_date"], r["customer_id"], r["product_id"]))
    for oid, row in enumerate(rows, 1):
        row["order_id"] = oid
    return rows


def write(path, rows, columns):
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(columns)
        out.writerows([r[c] for c in columns] for r in rows)


def main(out_dir):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = Rng(SEED)
    custs, prods = customers(rng), products()
    write(out / "customers.csv", custs, ["customer_id", "name", "region", "segment", "signup_date"])
    write(out / "products.csv", prods, ["product_id", "name", "category", "unit_price"])
    write(out / "orders.csv", orders(rng, custs, prods),
          ["order_id", "customer_id", "product_id", "order_date", "quantity", "amount", "status"])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
