"""Phone numbers to E.164 inside DuckDB, for every region, by phonenumbers' possible-number rules.

Contract (used by the Attentive format and by the users registry, so a file and a registry agree):

``e164_sql(value_sql, region) -> (sql, params)``
    ``sql`` is a DuckDB expression over the SQL expression ``value_sql`` (a VARCHAR column or expression),
    of type ``STRUCT(e164 VARCHAR, problem VARCHAR, valid BOOLEAN)``:

    - ``e164``: the number as ``+<country code><national significant number>``, NULL when it cannot be a
      phone number;
    - ``problem``: NULL when ``e164`` is set, else one of ``PROBLEMS``: ``not_a_number`` (a character that
      is neither a digit nor phone punctuation, or fewer than two digits), ``invalid_country_code`` (after
      ``+`` or the region's international prefix such as ``00`` / ``011`` no country code follows),
      ``too_short``, ``too_long``, ``invalid_length`` (between the shortest and the longest length of the
      country, but not one of its lengths);
    - ``valid``: for a number of ``region``'s own country code, false when it is possible but matches none
      of phonenumbers' number-type patterns of that code's regions (a fiction or unassigned range, such as
      GB ``07700 900123``), else true; for country code 1 the digit rule below; NULL for a number of any
      other country code (not checked: see the cost note at the end) and when ``e164`` is NULL.

    A NULL ``value_sql`` gives a NULL struct. ``params`` are the named parameters the expression uses, all
    called ``phones_<name>``, to merge into the caller's parameters (the same name always carries the same
    value, so two calls in one statement, even for two regions, never clash). No table or macro is needed:
    the expression runs on any connection. Rules are derived from phonenumbers' metadata once per process.

Reading, as ``phonenumbers.parse(value, region)`` then ``is_possible_number`` do, with these choices:

- Accepted characters are ASCII digits, an optional leading ``+`` and phone punctuation (spaces, ``-``,
  ``.``, ``/``, parentheses, brackets, ``~`` and unicode dashes); letters (vanity numbers, extensions such
  as ``x12``) are ``not_a_number``.
- ``+`` or the region's international prefix is followed by a country code (the first one to three digits
  naming a known country); else the number is national to ``region``, and a leading country code of the
  region is recognized as phonenumbers does (the number was too long, or only fits without it).
- For ``region``'s own country code, the national prefix (e.g. ``0`` in FR, GB, DE; carrier codes and
  prefix rewrites in AR, BR, GG, JE, ...) is dropped by ``national_prefix_for_parsing`` (and its transform
  rule) when what remains still has a possible length and does not spoil a number that fit the general
  pattern, also after the country code (``+33 (0)6 12 34 56 78``). For another country code, its literal
  ``national_prefix`` (``+44 (0)7700 900123``) is dropped when what remains has a possible length.
- The possible lengths are those of the country code's main region. A length phonenumbers calls "possible
  locally only" (a subscriber number without its area code) is ``too_short``: it cannot be dialled from
  abroad, so it has no E.164 form.
- Country code 1 (NANP) is read by its digits, as the Attentive seed requires: ten digits, or eleven
  starting with ``1``, are the national number; ``valid`` means area code and exchange start with 2-9. So
  ``1234567890``, ``123-456-7890``, ``1123-456-7890``, ``11234567890`` and ``+1 (123) 456-7890`` are all
  ``+11234567890`` (valid false). In a NANP region, the digit rule is tried before the international
  prefix ``011``.
- Not reproduced from phonenumbers: a ``+`` followed by no known country code is not re-read as a national
  number; fullwidth or non-ASCII digits are ``not_a_number``; the carrier codes and prefix rewrites of a
  country code other than ``region``'s (``+55 0xx``, BY's ``8 0``). Compared with ``phonenumbers.parse`` plus
  ``is_possible_number`` on ~13,000 spellings over all 245 regions (national, international, ``00``, ``(0)``,
  digit-dropped and random forms), only these choices differ.

Cost: everything runs in DuckDB, as one expression of chained ``list_transform`` steps (a struct gaining
fields), because DuckDB has no let-binding and repeats a repeated sub-expression. Nested lambdas bind in
time exponential in their depth, and a lambda's regexes are compiled again for every chunk of rows, so
the steps are chained, the regexes in them are the few small ones of one region, and other country codes
are read by lists (lengths, prefixes) indexed by the code. For 1M FR spellings this expression takes ~6 s, and
``benchmarks/phones_1m.py`` imports such a file with the CLI in 19 s (2 shared cores, load average 4).
"""

from __future__ import annotations

import functools
import re

import phonenumbers
from phonenumbers import PhoneMetadata
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

PROBLEMS = ("not_a_number", "invalid_country_code", "too_short", "too_long", "invalid_length")
NANP = "1"
# phonenumbers' _MIN_LENGTH_FOR_NSN and _MAX_LENGTH_FOR_NSN
MIN_NATIONAL, MAX_NATIONAL = 2, 17
PUNCTUATION = (" \t\n\r\f\v\u00a0\u00ad\u200b\u2060\u3000./()[]~\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u30fc"
               "\uff0d-")
SPELLING = r"\+?[0-9" + "".join(f"\\x{{{ord(c):04X}}}" for c in PUNCTUATION) + "]*"
NANP_VALID = r"[2-9][0-9]{2}[2-9][0-9]{6}"
NEVER = r"[^\s\S]"
_TYPES = ("fixed_line", "mobile", "toll_free", "premium_rate", "shared_cost", "personal_number", "voip",
          "pager", "uan", "voicemail")


class _Rule:
    """One region's (or non-geographic entity's) metadata as SQL pieces with bound patterns."""

    def __init__(self, key: str, metadata: PhoneMetadata, main: bool):
        self.key = key
        self.main = main
        self.cc = str(metadata.country_code)
        general = metadata.general_desc
        self.lengths = sorted(general.possible_length)
        self.local = sorted(general.possible_length_local_only)
        npp = metadata.national_prefix_for_parsing or ""
        self.npp_groups = re.compile(npp).groups if npp else 0
        self.transform = metadata.national_prefix_transform_rule or ""
        self.params = {
            f"phones_{key}_general": general.national_number_pattern or NEVER,
            f"phones_{key}_idd": f"^(?:{metadata.international_prefix})" if metadata.international_prefix else NEVER,
        }
        if npp:
            self.params[f"phones_{key}_npp"] = f"^(?:{npp})"
        if self.transform:
            self.params[f"phones_{key}_transform"] = self.transform
        self.has_npp = bool(npp)
        self.prefix = metadata.national_prefix or ""

    def p(self, field: str) -> str:
        return f"$phones_{self.key}_{field}"

    def length_test(self, number: str) -> str:
        """phonenumbers' _test_number_length for the general description: ok, local, too_short, ..."""
        local = f"WHEN length({number}) IN ({', '.join(map(str, self.local))}) THEN 'local' " if self.local else ""
        others = ", ".join(map(str, self.lengths[1:])) or "-1"
        return (f"(CASE {local}WHEN length({number}) = {self.lengths[0]} THEN 'ok' "
                f"WHEN length({number}) < {self.lengths[0]} THEN 'too_short' "
                f"WHEN length({number}) > {self.lengths[-1]} THEN 'too_long' "
                f"WHEN length({number}) IN ({others}) THEN 'ok' ELSE 'invalid_length' END)")

    def drop_prefix(self, number: str) -> str:
        """phonenumbers' _maybe_strip_national_prefix_carrier_code: the number without its national prefix
        (rewritten by the transform rule where the last group took part), unless that spoils a number
        that fit the general pattern."""
        if not self.has_npp:
            return number
        npp = self.p("npp")
        removed = f"regexp_replace({number}, {npp}, '')"
        if self.transform and self.npp_groups:
            # a group that took part is never empty in the metadata, so '' means "did not take part"
            stripped = (f"(CASE WHEN regexp_extract({number}, {npp}, {self.npp_groups}) <> '' "
                        f"THEN regexp_replace({number}, {npp}, {self.p('transform')}) ELSE {removed} END)")
        else:
            stripped = removed
        general = self.p("general")
        return (f"(CASE WHEN regexp_matches({number}, {npp}) AND (NOT regexp_full_match({number}, {general}) "
                f"OR regexp_full_match({stripped}, {general})) THEN {stripped} ELSE {number} END)")


def _stage(previous: str, **fields: str) -> str:
    """One step of the reading: ``phones_s``, the struct so far, with ``fields`` added. Steps are chained,
    not nested: DuckDB binds a nested lambda's body once per enclosing lambda, which took seconds."""
    added = ", ".join(f"{name} := {sql}" for name, sql in fields.items())
    return f"list_transform({previous}, lambda phones_s: struct_insert(phones_s, {added}))"


@functools.cache
def _tables() -> tuple[dict[str, _Rule], dict]:
    """Rules of every country code's main region (with its validity pattern), and their params."""
    by_cc: dict[str, _Rule] = {}
    params: dict = {}
    for cc, regions in sorted(COUNTRY_CODE_TO_REGION_CODE.items()):
        main = phonenumbers.region_code_for_country_code(cc)
        metadata = PhoneMetadata.metadata_for_region_or_calling_code(cc, main)
        rule = _Rule(f"cc{cc}", metadata, main=True)
        by_cc[str(cc)] = rule
        params |= rule.params
        patterns = []
        for region in regions:
            each = PhoneMetadata.metadata_for_region_or_calling_code(cc, region)
            for kind in _TYPES:
                desc = getattr(each, kind, None)
                if desc is not None and desc.national_number_pattern:
                    patterns.append(desc.national_number_pattern)
        params[f"phones_cc{cc}_valid"] = "|".join(f"(?:{p})" for p in dict.fromkeys(patterns)) or NEVER
    # Numbers with another country code than the feed's are read by lists indexed by the code's position
    # in $phones_ccs. No per-code regex: DuckDB compiles a lambda's regexes again for every chunk of rows,
    # and the 215 codes' patterns made that over a minute for 1M rows.
    params |= {
        "phones_spelling": SPELLING, "phones_punctuation": PUNCTUATION + "+", "phones_nanp_valid": NANP_VALID,
        "phones_ccs": list(by_cc), "phones_lengths": [r.lengths for r in by_cc.values()],
        "phones_local": [r.local for r in by_cc.values()],
        "phones_prefixes": [r.prefix for r in by_cc.values()],
    }
    return by_cc, params


@functools.cache
def _region_rule(region: str) -> _Rule:
    metadata = PhoneMetadata.metadata_for_region(region)
    if metadata is None:
        raise ValueError(f"{region!r} is not a region phonenumbers knows (ISO 3166 code such as US, FR, GB)")
    main = phonenumbers.region_code_for_country_code(metadata.country_code) == region
    return _Rule(f"r{region.lower()}", metadata, main=main)


def _quote(text: str) -> str:
    # only ever country codes from phonenumbers' metadata
    return "'" + text.replace("'", "''") + "'"


def _length_test(number: str) -> str:
    """_Rule.length_test for the country code at position ``phones_s.x`` of ``$phones_ccs``."""
    lengths = "$phones_lengths[phones_s.x]"
    return (f"(CASE WHEN list_contains($phones_local[phones_s.x], length({number})) THEN 'local' "
            f"WHEN length({number}) = {lengths}[1] THEN 'ok' "
            f"WHEN length({number}) < {lengths}[1] THEN 'too_short' "
            f"WHEN length({number}) > {lengths}[-1] THEN 'too_long' "
            f"WHEN list_contains({lengths}, length({number})) THEN 'ok' ELSE 'invalid_length' END)")


def _strip_any(number: str) -> str:
    """The national prefix of the country code at ``phones_s.x`` (its literal ``national_prefix``, e.g. the
    0 of ``+44 (0)20``) dropped from ``number``."""
    prefix = "$phones_prefixes[phones_s.x]"
    return (f"(CASE WHEN {prefix} <> '' AND starts_with({number}, {prefix}) "
            f"THEN substr({number}, length({prefix}) + 1) ELSE {number} END)")


def _pick_country_code(rest: str) -> str:
    return (f"CASE WHEN starts_with({rest}, '0') THEN NULL "
            + " ".join(f"WHEN list_contains($phones_ccs, left({rest}, {n})) THEN left({rest}, {n})"
                       for n in (1, 2, 3))
            + " END")


def e164_sql(value_sql: str, region: str) -> tuple[str, dict]:
    """The DuckDB expression reading ``value_sql`` as a phone number of ``region`` (see the module
    docstring for the STRUCT it yields), and its named parameters."""
    rule = _region_rule(region.upper())
    by_cc, params = _tables()
    main = by_cc[rule.cc]
    params = params | rule.params
    idd = rule.p("idd")
    after_idd = f"regexp_replace(phones_s.d, {idd}, '')"
    nanp = rule.cc == NANP
    # NANP: ten digits, or eleven starting with 1, are national before anything is read as 011
    nanp_national = ("NOT phones_s.plus AND (length(phones_s.d) = 10 "
                     "OR (length(phones_s.d) = 11 AND starts_with(phones_s.d, '1')))")
    # outside the US and Canada, seven digits are a local number the region's area code completes
    local_nanp = (f"length(phones_s.d) = 7 AND regexp_matches(phones_s.d, {rule.p('npp')})"
                  if nanp and rule.transform else "")
    if local_nanp:
        nanp_national = f"({nanp_national} OR (NOT phones_s.plus AND {local_nanp}))"
    international = (f"CASE WHEN phones_s.plus THEN phones_s.d WHEN regexp_matches(phones_s.d, {idd}) "
                     f"AND NOT starts_with({after_idd}, '0') THEN {after_idd} END")
    if nanp:
        international = f"CASE WHEN {nanp_national} THEN NULL ELSE {international} END"
    # the first step is outside any lambda, where DuckDB compiles its regexes once
    text = f"trim(({value_sql})::VARCHAR)"
    # once the spelling is checked, deleting its known punctuation is cheaper than a regex replace
    digits = f"translate({text}, $phones_punctuation, '')"
    stages = (f"[{{'d': {digits}, 'plus': starts_with({text}, '+'), "
              f"'p1': CASE WHEN NOT regexp_full_match({text}, $phones_spelling) OR length({digits}) < {MIN_NATIONAL} "
              "THEN 'not_a_number' END}]")
    stages = _stage(stages, rest=international)
    national_problem = ("WHEN phones_s.rest IS NULL AND NOT (" + nanp_national + ") THEN "
                        "CASE WHEN length(phones_s.d) < 10 THEN 'too_short' ELSE 'too_long' END ") if nanp else ""
    stages = _stage(
        stages,
        cc=f"CASE WHEN phones_s.rest IS NULL THEN {_quote(rule.cc)} ELSE {_pick_country_code('phones_s.rest')} END",
        p3=(f"CASE WHEN phones_s.rest IS NOT NULL AND length(phones_s.rest) <= {MIN_NATIONAL} THEN 'too_short' "
            f"WHEN phones_s.rest IS NOT NULL AND ({_pick_country_code('phones_s.rest')}) IS NULL "
            f"THEN 'invalid_country_code' {national_problem}END"),
        w="NULL::VARCHAR" if nanp else rule.drop_prefix(f"substr(phones_s.d, {len(rule.cc) + 1})"))
    general = rule.p("general")
    # phonenumbers' reading of a leading country code of the region: the number was too long, or only
    # fits the general pattern without it
    has_cc = (f"starts_with(phones_s.d, {_quote(rule.cc)}) AND ("
              f"(NOT regexp_full_match(phones_s.d, {general}) AND regexp_full_match(phones_s.w, {general})) "
              f"OR {rule.length_test('phones_s.d')} = 'too_long')")
    if nanp:
        national, national_mode = "right(phones_s.d, 10)", "'nanp'"
        if local_nanp:
            national = (f"CASE WHEN {local_nanp} THEN regexp_replace(phones_s.d, {rule.p('npp')}, "
                        f"{rule.p('transform')}) ELSE {national} END")
    else:
        # with the country code written, phonenumbers reads the rest by the code's main region
        national = f"CASE WHEN {has_cc} THEN phones_s.w ELSE phones_s.d END"
        national_mode = "'region'" if rule.main else f"CASE WHEN {has_cc} THEN 'main' ELSE 'region' END"
    stages = _stage(
        stages,
        x="list_position($phones_ccs, phones_s.cc)",
        nat=f"CASE WHEN phones_s.rest IS NULL THEN {national} ELSE substr(phones_s.rest, length(phones_s.cc) + 1) END",
        mode=(f"CASE WHEN phones_s.rest IS NULL THEN {national_mode} "
              f"WHEN phones_s.cc = '{NANP}' THEN 'nanp' ELSE 'main' END"))
    own = f"phones_s.cc = {_quote(rule.cc)}"
    stages = _stage(
        stages,
        n=(f"CASE WHEN phones_s.mode = 'region' THEN {rule.drop_prefix('phones_s.nat')} "
           f"WHEN phones_s.mode = 'main' AND {own} THEN {main.drop_prefix('phones_s.nat')} "
           f"WHEN phones_s.mode = 'main' THEN {_strip_any('phones_s.nat')} ELSE phones_s.nat END"),
        p6=f"CASE WHEN phones_s.mode <> 'nanp' AND length(phones_s.nat) < {MIN_NATIONAL} THEN 'too_short' END")
    # the national prefix is dropped only when what remains is not too short for the region
    stages = _stage(stages, f=(
        "CASE WHEN phones_s.mode = 'nanp' THEN phones_s.nat "
        f"WHEN (CASE WHEN phones_s.mode = 'region' THEN {rule.length_test('phones_s.n')} "
        f"ELSE {_length_test('phones_s.n')} END) IN ('too_short', 'local', 'invalid_length') "
        "THEN phones_s.nat ELSE phones_s.n END"))
    stages = _stage(stages, length=(
        "CASE WHEN phones_s.mode = 'nanp' THEN CASE WHEN length(phones_s.f) < 10 THEN 'too_short' "
        "WHEN length(phones_s.f) > 10 THEN 'too_long' ELSE 'ok' END "
        f"WHEN length(phones_s.f) > {MAX_NATIONAL} THEN 'too_long' ELSE {_length_test('phones_s.f')} END"))
    stages = _stage(stages, problem=(
        "coalesce(phones_s.p1, phones_s.p3, phones_s.p6, CASE phones_s.length WHEN 'ok' THEN NULL "
        "WHEN 'local' THEN 'too_short' ELSE phones_s.length END)"))
    valid = (f"CASE WHEN phones_s.cc = '{NANP}' THEN regexp_full_match(phones_s.f, $phones_nanp_valid) "
             f"WHEN {own} THEN regexp_full_match(phones_s.f, $phones_cc{rule.cc}_valid) END")
    result = (f"list_transform({stages}, lambda phones_s: {{"
              "'e164': CASE WHEN phones_s.problem IS NULL THEN '+' || phones_s.cc || phones_s.f END, "
              "'problem': phones_s.problem, "
              f"'valid': CASE WHEN phones_s.problem IS NULL THEN {valid} END}})[1]")
    sql = f"(CASE WHEN ({value_sql}) IS NULL THEN NULL ELSE {result} END)"
    # DuckDB refuses parameters a statement does not use
    used = set(re.findall(r"\$(phones_\w+)", sql))
    return sql, {name: value for name, value in params.items() if name in used}
