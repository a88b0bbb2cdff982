def summarize_orders(orders, tax_rate=0.08, discount_codes=None):
    """Summarize a list of orders into totals per customer."""
    if discount_codes is None:
        discount_codes = {}
    summary = {}
    for order in orders:
        customer = order.get("customer", "unknown")
        items = order.get("items", [])
        subtotal = 0.0
        for item in items:
            price = float(item.get("price", 0))
            quantity = int(item.get("quantity", 1))
            if quantity < 0:
                raise ValueError(f"negative quantity in order {order.get('id')}")
            subtotal += price * quantity
        code = order.get("discount")
        if code and code in discount_codes:
            subtotal *= 1.0 - discount_codes[code]
        tax = subtotal * tax_rate
        total = subtotal + tax
        entry = summary.setdefault(customer, {"orders": 0, "subtotal": 0.0, "tax": 0.0, "total": 0.0})
        entry["orders"] += 1
        entry["subtotal"] += subtotal
        entry["tax"] += tax
        entry["total"] += total
    for customer, entry in summary.items():
        entry["average"] = entry["total"] / entry["orders"]
        entry["subtotal"] = round(entry["subtotal"], 2)
        entry["tax"] = round(entry["tax"], 2)
        entry["total"] = round(entry["total"], 2)
    return summary
