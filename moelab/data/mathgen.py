"""Synthetic school-maths problems in the style of DeepMind Mathematics (Saxton et al. 2019).

Each problem is a question line followed by its answer line, as in the DeepMind release
(``arithmetic__add_or_sub``, ``algebra__linear_1d``, ``comparison__sort`` ...). Answers are computed
exactly with :class:`fractions.Fraction`, never with floats, so ``0.1 + 0.2`` is ``0.3``.

Every document draws from its own ``random.Random`` seeded by a string (string seeds are hashed with
SHA-512 by :mod:`random`, so they do not depend on ``PYTHONHASHSEED``): the same seed gives the same
problems on every machine and Python >= 3.2.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction
from typing import Callable

Problem = tuple[str, str]  # (question, answer)

_VARS = "abcdfghjklmnpqrstuvwxyz"  # no e, i, o: they read as constants or zero


def fmt(q: Fraction | int) -> str:
    """An exact number as DeepMind writes it: integer, terminating decimal, or reduced fraction."""
    q = Fraction(q)
    if q.denominator == 1:
        return str(q.numerator)
    d = q.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return f"{q.numerator}/{q.denominator}"
    digits = 0
    while (q * 10**digits).denominator != 1:
        digits += 1
    return f"{float(q):.{digits}f}" if digits <= 12 else f"{q.numerator}/{q.denominator}"


def _number(rng: random.Random, big: bool = False) -> Fraction:
    """An integer, or sometimes a decimal with one or two places."""
    hi = 10_000 if big else 200
    kind = rng.random()
    if kind < 0.7:
        return Fraction(rng.randint(-hi, hi))
    places = rng.choice((1, 2))
    return Fraction(rng.randint(-hi * 10, hi * 10), 10**places)


def _paren(q: Fraction) -> str:
    s = fmt(q)
    return f"({s})" if q < 0 else s


def add_or_sub(rng: random.Random) -> Problem:
    a, b = _number(rng, big=True), _number(rng, big=True)
    if rng.random() < 0.5:
        q = rng.choice(("What is {a} + {b}?", "Calculate {a} + {b}.", "Add {a} and {b}.",
                        "Sum {a} and {b}.", "Total of {a} and {b}."))
        return q.format(a=fmt(a), b=fmt(b)), fmt(a + b)
    q = rng.choice(("What is {a} - {b}?", "Calculate {a} - {b}.", "Subtract {b} from {a}.",
                    "What is {b} less than {a}?", "{a} - {b}"))
    return q.format(a=fmt(a), b=fmt(b)), fmt(a - b)


def mul(rng: random.Random) -> Problem:
    a, b = _number(rng), _number(rng)
    q = rng.choice(("What is {a} times {b}?", "Multiply {a} and {b}.", "Calculate {a} * {b}.",
                    "Product of {a} and {b}.", "{a} * {b}"))
    return q.format(a=fmt(a), b=_paren(b)), fmt(a * b)


def div(rng: random.Random) -> Problem:
    b = Fraction(rng.choice([i for i in range(-40, 41) if i not in (0, 1, -1)]))
    ans = Fraction(rng.randint(-300, 300))
    a = ans * b
    q = rng.choice(("Divide {a} by {b}.", "What is {a} divided by {b}?", "Calculate {a} / {b}.",
                    "{a} divided by {b}"))
    return q.format(a=fmt(a), b=fmt(b) if rng.random() < 0.5 else _paren(b)), fmt(ans)


def mixed(rng: random.Random) -> Problem:
    """A bracketed expression of 3 or 4 small integers; the answer may be a fraction."""
    ops = ("+", "-", "*", "/")
    n = rng.choice((3, 4))
    terms = [Fraction(rng.randint(-20, 20)) for _ in range(n)]
    expr = fmt(terms[0])
    for i, t in enumerate(terms[1:]):
        op = rng.choice(ops)
        if op == "/" and t == 0:
            op = "+"
        group = i > 0 and rng.random() < 0.5  # bracket what came before, as in "(3 - 5) * 4"
        expr = f"({expr}) {op} {_paren(t)}" if group else f"{expr} {op} {_paren(t)}"
    value = _eval(expr)  # Python's precedence, exactly
    q = rng.choice(("Evaluate {e}.", "What is the value of {e}?", "Calculate {e}.", "What is {e}?"))
    return q.format(e=expr), fmt(value)


def _eval(expr: str) -> Fraction:
    """Exact value of an expression of integers, + - * / and brackets (precedence as in Python)."""
    import ast

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if isinstance(node.op, ast.Div):
                return left / right  # divisors are single non-zero terms
        raise ValueError(f"unsupported expression {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def linear_1d(rng: random.Random) -> Problem:
    v = rng.choice(_VARS)
    x = rng.randint(-15, 15)
    a = rng.choice([i for i in range(-12, 13) if i != 0])
    b = rng.randint(-60, 60)
    c = a * x + b
    lhs = f"{a}*{v}" if a not in (1, -1) else ("" if a == 1 else "-") + v
    lhs += f" + {b}" if b > 0 else (f" - {-b}" if b < 0 else "")
    return f"Solve {lhs} = {c} for {v}.", str(x)


def linear_2d(rng: random.Random) -> Problem:
    v, w = rng.sample(_VARS, 2)
    x, y = rng.randint(-10, 10), rng.randint(-10, 10)
    while True:
        a, b, c, d = (rng.choice([i for i in range(-7, 8) if i != 0]) for _ in range(4))
        if a * d - b * c != 0:
            break

    def term(c: int, var: str) -> str:
        return var if c == 1 else f"{c}*{var}"

    def side(p: int, q: int) -> str:
        return f"{'-' + v if p == -1 else term(p, v)} {'+' if q > 0 else '-'} {term(abs(q), w)}"

    target = rng.choice((v, w))
    ans = x if target == v else y
    return (f"Solve {side(a, b)} = {a * x + b * y}, {side(c, d)} = {c * x + d * y} for {target}.", str(ans))


def compare_pair(rng: random.Random) -> Problem:
    a, b = _number(rng), _number(rng)
    while a == b:
        b = _number(rng)
    kind = rng.randrange(4)
    if kind == 0:
        return f"Which is bigger: {fmt(a)} or {fmt(b)}?", fmt(max(a, b))
    if kind == 1:
        return f"Which is smaller: {fmt(a)} or {fmt(b)}?", fmt(min(a, b))
    if kind == 2:
        return f"Is {fmt(a)} greater than {fmt(b)}?", str(a > b)
    return f"Is {fmt(a)} less than or equal to {fmt(b)}?", str(a <= b)


def sort(rng: random.Random) -> Problem:
    xs = list(dict.fromkeys(_number(rng) for _ in range(rng.randint(3, 6))))  # dedupe, keep order
    rng.shuffle(xs)
    desc = rng.random() < 0.5
    order = "decreasing" if desc else "increasing"
    return (f"Sort {', '.join(fmt(x) for x in xs)} in {order} order.",
            ", ".join(fmt(x) for x in sorted(xs, reverse=desc)))


def kth_biggest(rng: random.Random) -> Problem:
    xs = list(dict.fromkeys(_number(rng) for _ in range(rng.randint(3, 6))))  # dedupe, keep order
    rng.shuffle(xs)
    k = rng.randint(1, min(3, len(xs)))
    word = ("biggest", "second biggest", "third biggest")[k - 1]
    if rng.random() < 0.5:
        word = word.replace("biggest", "smallest")
        ans = sorted(xs)[k - 1]
    else:
        ans = sorted(xs, reverse=True)[k - 1]
    return f"What is the {word} value in {', '.join(fmt(x) for x in xs)}?", fmt(ans)


def gcd_lcm(rng: random.Random) -> Problem:
    g = rng.randint(1, 30)
    a, b = g * rng.randint(1, 40), g * rng.randint(1, 40)
    if rng.random() < 0.5:
        return f"Calculate the greatest common divisor of {a} and {b}.", str(math.gcd(a, b))
    return f"What is the lowest common multiple of {a} and {b}?", str(a * b // math.gcd(a, b))


def is_prime(rng: random.Random) -> Problem:
    n = rng.randint(2, 5000)
    prime = n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))
    return rng.choice(("Is {n} a prime number?", "Is {n} prime?")).format(n=n), str(prime)


def remainder(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 5000), rng.randint(2, 60)
    return f"What is the remainder when {a} is divided by {b}?", str(a % b)


def place_value(rng: random.Random) -> Problem:
    n = rng.randint(100, 9_999_999)
    names = ("units", "tens", "hundreds", "thousands", "ten thousands", "hundred thousands", "millions")
    k = rng.randrange(len(str(n)))
    return f"What is the {names[k]} digit of {n}?", str(n // 10**k % 10)


def round_number(rng: random.Random) -> Problem:
    if rng.random() < 0.5:
        x = Fraction(rng.randint(-10**6, 10**6), 10**4)
        places = rng.choice((0, 1, 2))
        word = ("the nearest integer", "one decimal place", "two decimal places")[places]
        return f"Round {fmt(x)} to {word}.", fmt(_round_half_away(x, Fraction(1, 10**places)))
    x = Fraction(rng.randint(-10**7, 10**7))
    unit = rng.choice((10, 100, 1000, 10_000))
    return f"Round {fmt(x)} to the nearest {unit}.", fmt(_round_half_away(x, Fraction(unit)))


def _round_half_away(x: Fraction, unit: Fraction) -> Fraction:
    q = abs(x) / unit
    r = math.floor(q + Fraction(1, 2))
    return (r if x >= 0 else -r) * unit


def polynomial_eval(rng: random.Random) -> Problem:
    f = rng.choice("fghjkpqrsuvwy")
    v = rng.choice(_VARS)
    coeffs = [rng.randint(-9, 9) for _ in range(rng.randint(2, 4))]  # highest degree first
    if coeffs[0] == 0:
        coeffs[0] = 1
    x = rng.randint(-6, 6)
    value = sum(c * x ** (len(coeffs) - 1 - i) for i, c in enumerate(coeffs))
    return f"Let {f}({v}) = {_poly(coeffs, v)}. What is {f}({x})?", str(value)


def _poly(coeffs: list[int], v: str) -> str:
    """Coefficients, highest degree first, written as DeepMind does: 3*x**2 - x + 5."""
    out = []
    deg = len(coeffs) - 1
    for i, c in enumerate(coeffs):
        p = deg - i
        if c == 0:
            continue
        mag = abs(c)
        body = (str(mag) if p == 0 else
                (("" if mag == 1 else f"{mag}*") + v + (f"**{p}" if p > 1 else "")))
        sign = "-" if c < 0 else "+"
        out.append(body if not out and c > 0 else (f"-{body}" if not out else f"{sign} {body}"))
    return " ".join(out) if out else "0"


def differentiate(rng: random.Random) -> Problem:
    v = rng.choice(_VARS)
    coeffs = [rng.randint(-9, 9) for _ in range(rng.randint(2, 5))]
    if coeffs[0] == 0:
        coeffs[0] = 2
    deg = len(coeffs) - 1
    deriv = [c * (deg - i) for i, c in enumerate(coeffs[:-1])]
    q = rng.choice(("Find the first derivative of {p} wrt {v}.", "Differentiate {p} with respect to {v}.",
                    "What is the derivative of {p} wrt {v}?"))
    return q.format(p=_poly(coeffs, v), v=v), _poly(deriv, v)


_UNITS = (  # (singular, plural, size in a base unit) per quantity
    (("kilometre", "kilometres", 1000), ("metre", "metres", 1), ("centimetre", "centimetres", Fraction(1, 100)),
     ("millimetre", "millimetres", Fraction(1, 1000))),
    (("kilogram", "kilograms", 1000), ("gram", "grams", 1), ("milligram", "milligrams", Fraction(1, 1000))),
    (("litre", "litres", 1000), ("millilitre", "millilitres", 1)),
    (("week", "weeks", 7 * 24 * 60), ("day", "days", 24 * 60), ("hour", "hours", 60), ("minute", "minutes", 1)),
)


def convert(rng: random.Random) -> Problem:
    units = rng.choice(_UNITS)
    (s1, p1, f1), (s2, p2, f2) = rng.sample(units, 2)
    x = Fraction(rng.randint(1, 400), rng.choice((1, 1, 2, 4, 10)))
    ans = x * Fraction(f1) / Fraction(f2)
    return f"How many {p2} are there in {fmt(x)} {s1 if x == 1 else p1}?", fmt(ans)


def base_conversion(rng: random.Random) -> Problem:
    n = rng.randint(1, 4000)
    base = rng.choice((2, 3, 4, 5, 8, 16))
    digits = "0123456789abcdef"
    s, m = "", n
    while m:
        s, m = digits[m % base] + s, m // base
    if rng.random() < 0.5:
        return f"Convert {n} (base 10) to base {base}.", s
    return f"What is {s} (base {base}) in base 10?", str(n)


MODULES: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic__add_or_sub": add_or_sub, "arithmetic__mul": mul, "arithmetic__div": div,
    "arithmetic__mixed": mixed, "algebra__linear_1d": linear_1d, "algebra__linear_2d": linear_2d,
    "comparison__pair": compare_pair, "comparison__sort": sort, "comparison__kth_biggest": kth_biggest,
    "numbers__gcd_lcm": gcd_lcm, "numbers__is_prime": is_prime, "numbers__div_remainder": remainder,
    "numbers__place_value": place_value, "numbers__round_number": round_number,
    "numbers__base_conversion": base_conversion, "polynomials__evaluate": polynomial_eval,
    "calculus__differentiate": differentiate, "measurement__conversion": convert,
}


def math_document(seed: int, module: str, index: int, problems: int = 12) -> str:
    """``problems`` question/answer pairs from one module, one pair per two lines."""
    rng = random.Random(f"moelab-math:{seed}:{module}:{index}")
    gen = MODULES[module]
    return "".join(f"{q}\n{a}\n" for q, a in (gen(rng) for _ in range(problems)))
