"""InstantDB's deterministic ids for system attributes and idents.

A short string is packed five bits per character into 64 bits (padded with 1 bits); a system id is
the UUID whose high half packs "system<type>" and whose low half packs "<etype code>/<label code>".
"""

import uuid

_ALPHABET = "abcdefghijklmnopqrstuvwxzy/"  # 'z' before 'y' is InstantDB's, not a typo
_MAX_CHARS = 12


def encode_short_string(text: str) -> int:
    """The 64-bit pattern of `text`, as an unsigned integer."""
    if len(text) > _MAX_CHARS:
        raise ValueError(f"{text!r} is longer than {_MAX_CHARS} characters")
    bits = ""
    for char in text:
        index = _ALPHABET.find(char)
        if index < 0:
            raise ValueError(f"{char!r} in {text!r} is not in the system id alphabet {_ALPHABET!r}")
        bits += format(index, "05b")
    return int(bits.ljust(64, "1"), 2)


def system_id(kind: str, etype_code: str, label_code: str) -> uuid.UUID:
    """`kind` is 'at' for attrs and 'id' for idents."""
    high = encode_short_string("system" + kind)
    low = encode_short_string(f"{etype_code}/{label_code}")
    return uuid.UUID(int=(high << 64) | low)


def system_attr_id(etype_code: str, label_code: str) -> uuid.UUID:
    return system_id("at", etype_code, label_code)


def system_ident_id(etype_code: str, label_code: str) -> uuid.UUID:
    return system_id("id", etype_code, label_code)
