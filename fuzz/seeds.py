#!/usr/bin/env python3
"""Writes the seed corpora, fuzz/corpus/<target>/seed-*, from the samples the
unit tests use (see docs/FUZZING.md). Run from anywhere: python3 fuzz/seeds.py
"""
import json
import pathlib
import struct
import zlib

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"
ID = "7f1d8a5e-3c2b-4a8e-9f00-0123456789ab"
OUTBOX = ["id", "created_at", "origin", "type", "entity_key", "data"]


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data if isinstance(data, bytes) else data.encode())


# pgoutput: as pgoutput.rs's tests (relation_bytes, insert_bytes) encode them.
def relation(rid, ns, name, columns):
    b = b"R" + struct.pack(">I", rid) + ns.encode() + b"\0" + name.encode() + b"\0" + b"d"
    b += struct.pack(">H", len(columns))
    for i, col in enumerate(columns):
        b += bytes([int(i == 0)]) + col.encode() + b"\0" + struct.pack(">Ii", 25, -1)
    return b


def insert(rid, values):
    b = b"I" + struct.pack(">I", rid) + b"N" + struct.pack(">H", len(values))
    for v in values:
        if v is None:
            b += b"n"
        elif isinstance(v, tuple):  # ('b', bytes) or ('u',)
            b += v[0].encode() + (struct.pack(">I", len(v[1])) + v[1] if v[0] == "b" else b"")
        else:
            b += b"t" + struct.pack(">I", len(v.encode())) + v.encode()
    return b


write("pgoutput", "relation-outbox", relation(16385, "public", "outbox", OUTBOX))
write("pgoutput", "insert-outbox", insert(16385, [ID, "2026-11-23 16:11:28.123456+00", "PARIS",
                                                  "customer.upsert", "42", '{"name": "Zoé", "n": 1}']))
write("pgoutput", "insert-null-and-empty", insert(7, ["abc", None, ""]))
write("pgoutput", "insert-binary-unchanged", insert(7, [("b", b"\x00\xff"), ("u",), None]))
write("pgoutput", "type", b"Y" + struct.pack(">I", 16390) + b"public\0mood\0")
write("pgoutput", "origin", b"O" + struct.pack(">Q", 0x16B3748) + b"pg_origin\0")

# event: bodies as Event::to_body writes them (event.rs's tests' row).
event = {
    "id": ID,
    "timestamp": "2026-11-23T16:11:28.123456Z",
    "origin": "PARIS",
    "type": "customer.upsert",
    "entity_key": "42",
    "data": "DATA",
    "epoch": 7,
    "seq": 3,
}


def body(e, data):
    return json.dumps(e, separators=(",", ":"), ensure_ascii=False).replace('"DATA"', data)


write("event", "customer-upsert", body(event, '{"name": "Zoé", "n": 1}'))
write("event", "no-entity-key", body({**event, "entity_key": None, "seq": 1,
                                      "timestamp": "2026-01-01T00:00:10.000001Z"}, "{}"))
write("event", "nested-data", body({**event, "origin": "LONDON", "type": "order.created"},
                                   '{"lines":[{"sku":"A-1","qty":2}],"total":1.5e2,"note":null}'))

# checkpoint: records as Checkpoint::encode writes them, one per engine.
def record(resume):
    ck = {"format": 1, "resume": resume, "epoch": 1767225600000, "next_seq": 42,
          "last_ts": "2026-11-23T16:11:28.123456Z", "written_at": "2026-11-23T16:11:29.5Z"}
    j = json.dumps(ck, separators=(",", ":")).encode()
    return struct.pack("<I", zlib.crc32(j)) + j


write("checkpoint", "postgres", record({"engine": "postgres", "lsn": "0/16B3748", "index": 3}))
write("checkpoint", "sqlserver", record({"engine": "sql_server", "version": 9876, "index": 2,
                                         "after_ordinal": 1234}))
write("checkpoint", "oracle", record({"engine": "oracle", "scn": 123456789, "index": 0,
                                      "mine_from": 123456700}))
write("checkpoint", "mariadb", record({"engine": "mariadb", "file": "mariadb-bin.000001",
                                       "offset": 1234, "index": 3, "mariadb_gtid": "0-1-42"}))
write("checkpoint", "first", record(None))

# positions: the texts the position tests and the docs use.
for name, text in [
    ("postgres", "postgres:0/16B3748"),
    ("postgres-index", "postgres:1/16B37480#3"),
    ("lsn", "FFFFFFFF/FFFFFFFF"),
    ("sqlserver", "sqlserver:9876#2/1234"),
    ("oracle", "oracle:123456789#0@123456700"),
    ("mariadb", "mariadb:0-1-42@mariadb-bin.000001:1234#3"),
    ("mariadb-no-gtid", "mariadb:mysql-bin.000003:4567"),
    ("mysql-set", "mariadb:3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7-9,"
                  "8f2a4c10-0b5e-11ee-8c90-0242ac120002:1-3@binlog.000001:4#0"),
    ("mariadb-state", "0-1-10,\n1-2-5"),
    ("postgres-json", '{"engine":"postgres","lsn":"0/16B3748","index":2}'),
    ("mariadb-json", '{"engine":"mariadb","file":"mysql-bin.000003","offset":4567,"index":2,'
                     '"mariadb_gtid":"0-1-10,1-2-5"}'),
    ("timestamp", "2026-11-23 16:11:28.123456+00"),
    ("timestamp-rfc3339", "2026-11-23T17:11:28+01:00"),
]:
    write("positions", name, text)

# binlog: first byte picks the decoder (0 GTID, 1 GTID_LIST, 2 ROTATE, 3 epoch).
write("binlog", "gtid", b"\0" + struct.pack("<QIB", 10, 7, 1))
gtids = [(0, 1, 10), (3, 2, 5)]
write("binlog", "gtid-list", b"\1" + struct.pack("<I", len(gtids) | 0x10000000)
      + b"".join(struct.pack("<IIQ", *g) for g in gtids))
header = struct.pack("<IBIIIH", 0, 4, 1, 0x2F, 0, 0x20)
rotate = struct.pack("<Q", 4) + b"mariadb-bin.000001"
write("binlog", "rotate", b"\2" + header + rotate)
write("binlog", "rotate-checksum", b"\2" + header + rotate
      + struct.pack("<I", zlib.crc32(header + rotate)))
write("binlog", "epoch", b"\3" + b"1733211234.123456")
