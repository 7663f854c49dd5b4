//! The part of the pgoutput protocol (version 1) that pgwire-replication
//! leaves to us: Relation and Insert messages.
//!
//! pgwire-replication decodes Begin, Commit and logical Messages itself and
//! hands every other change as the raw bytes of one `XLogData` payload. We
//! need two of them: `Relation` (`R`), which tells a relation's id, name and
//! column names before its first change in a session, and `Insert` (`I`),
//! whose tuple carries each column as NULL, unchanged-TOAST or text.
//! Everything else (Type, Origin, Update, Delete, Truncate) is recognised and
//! ignored: the publication only publishes inserts on the outbox.
//!
//! Reference: PostgreSQL documentation, "Logical Replication Message Formats".

use bytes::Bytes;

/// A decoded pgoutput message we care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutput {
    Relation(Relation),
    Insert {
        relation_id: u32,
        tuple: Vec<Column>,
    },
    /// A message we do not act on (Type, Origin, Update, Delete, Truncate…),
    /// by its tag byte.
    Other(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<String>,
}

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    Null,
    /// An unchanged TOASTed value (never in an INSERT, listed for completeness).
    Unchanged,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

struct Cursor {
    buf: Bytes,
    at: usize,
}

impl Cursor {
    fn need(&self, n: usize, what: &str) -> Result<(), DecodeError> {
        if self.buf.len() - self.at < n {
            Err(DecodeError(format!(
                "truncated {what}: need {n} bytes at offset {}, {} left",
                self.at,
                self.buf.len() - self.at
            )))
        } else {
            Ok(())
        }
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        self.need(1, what)?;
        self.at += 1;
        Ok(self.buf[self.at - 1])
    }

    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        self.need(2, what)?;
        let v = u16::from_be_bytes([self.buf[self.at], self.buf[self.at + 1]]);
        self.at += 2;
        Ok(v)
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.need(4, what)?;
        let v = u32::from_be_bytes(self.buf[self.at..self.at + 4].try_into().expect("4 bytes"));
        self.at += 4;
        Ok(v)
    }

    fn cstring(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.at..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError(format!("unterminated {what}")))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.at += end + 1;
        Ok(s)
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes, DecodeError> {
        self.need(n, what)?;
        let b = self.buf.slice(self.at..self.at + n);
        self.at += n;
        Ok(b)
    }

    /// Room for `count` items announced by the message, each at least
    /// `min_bytes` long: no more than the bytes left can hold, so that a
    /// made-up count cannot make us allocate before the bytes run out.
    fn capacity(&self, count: usize, min_bytes: usize) -> usize {
        count.min((self.buf.len() - self.at) / min_bytes)
    }
}

/// The fewest bytes a Relation message's column takes: flags, an empty
/// name's terminator, type oid and modifier.
const MIN_RELATION_COLUMN: usize = 1 + 1 + 4 + 4;

/// Decodes one pgoutput message (an `XLogData` payload).
pub fn decode(data: Bytes) -> Result<PgOutput, DecodeError> {
    let mut c = Cursor { buf: data, at: 0 };
    let tag = c.u8("message tag")?;
    match tag {
        b'R' => {
            let id = c.u32("relation id")?;
            let namespace = c.cstring("relation namespace")?;
            let name = c.cstring("relation name")?;
            let _replica_identity = c.u8("replica identity")?;
            let n = c.u16("column count")?;
            let mut columns = Vec::with_capacity(c.capacity(n.into(), MIN_RELATION_COLUMN));
            for _ in 0..n {
                let _flags = c.u8("column flags")?;
                columns.push(c.cstring("column name")?);
                let _type_oid = c.u32("column type")?;
                let _typmod = c.u32("column type modifier")?;
            }
            Ok(PgOutput::Relation(Relation {
                id,
                namespace,
                name,
                columns,
            }))
        }
        b'I' => {
            let relation_id = c.u32("relation id")?;
            let marker = c.u8("new tuple marker")?;
            if marker != b'N' {
                return Err(DecodeError(format!(
                    "insert: expected new tuple marker 'N', found {:?}",
                    marker as char
                )));
            }
            let tuple = tuple(&mut c)?;
            Ok(PgOutput::Insert { relation_id, tuple })
        }
        other => Ok(PgOutput::Other(other)),
    }
}

fn tuple(c: &mut Cursor) -> Result<Vec<Column>, DecodeError> {
    let n = c.u16("tuple column count")?;
    // Each column is at least its kind byte.
    let mut out = Vec::with_capacity(c.capacity(n.into(), 1));
    for i in 0..n {
        let kind = c.u8("column kind")?;
        out.push(match kind {
            b'n' => Column::Null,
            b'u' => Column::Unchanged,
            b't' | b'b' => {
                let len = c.u32("column length")? as usize;
                let value = c.bytes(len, "column value")?;
                if kind == b't' {
                    Column::Text(value)
                } else {
                    Column::Binary(value)
                }
            }
            other => {
                return Err(DecodeError(format!(
                    "column {i}: unknown kind byte {other:#04x}"
                )));
            }
        });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encodes a Relation message the way the server does.
    pub fn relation_bytes(id: u32, ns: &str, name: &str, columns: &[&str]) -> Bytes {
        let mut b = vec![b'R'];
        b.extend_from_slice(&id.to_be_bytes());
        for s in [ns, name] {
            b.extend_from_slice(s.as_bytes());
            b.push(0);
        }
        b.push(b'd');
        b.extend_from_slice(&(columns.len() as u16).to_be_bytes());
        for (i, col) in columns.iter().enumerate() {
            b.push(u8::from(i == 0));
            b.extend_from_slice(col.as_bytes());
            b.push(0);
            b.extend_from_slice(&25u32.to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
        }
        Bytes::from(b)
    }

    /// Encodes an Insert message with text or NULL values.
    pub fn insert_bytes(id: u32, values: &[Option<&str>]) -> Bytes {
        let mut b = vec![b'I'];
        b.extend_from_slice(&id.to_be_bytes());
        b.push(b'N');
        b.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => b.push(b'n'),
                Some(s) => {
                    b.push(b't');
                    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
            }
        }
        Bytes::from(b)
    }

    #[test]
    fn relation_round_trip() {
        let msg = decode(relation_bytes(16385, "public", "outbox", &["id", "data"])).unwrap();
        assert_eq!(
            msg,
            PgOutput::Relation(Relation {
                id: 16385,
                namespace: "public".into(),
                name: "outbox".into(),
                columns: vec!["id".into(), "data".into()],
            })
        );
    }

    #[test]
    fn insert_with_null_and_text() {
        let msg = decode(insert_bytes(7, &[Some("abc"), None, Some("")])).unwrap();
        assert_eq!(
            msg,
            PgOutput::Insert {
                relation_id: 7,
                tuple: vec![
                    Column::Text(Bytes::from_static(b"abc")),
                    Column::Null,
                    Column::Text(Bytes::new()),
                ],
            }
        );
    }

    #[test]
    fn other_messages_are_recognised_and_ignored() {
        assert_eq!(
            decode(Bytes::from_static(b"Yxxxx")).unwrap(),
            PgOutput::Other(b'Y')
        );
        assert_eq!(
            decode(Bytes::from_static(b"O")).unwrap(),
            PgOutput::Other(b'O')
        );
    }

    #[test]
    fn truncated_and_garbled_input_is_an_error_never_a_panic() {
        let full = insert_bytes(7, &[Some("abcdef"), None]);
        for cut in 0..full.len() {
            let r = decode(full.slice(..cut));
            assert!(r.is_err(), "cut at {cut} decoded: {r:?}");
        }
        let rel = relation_bytes(1, "public", "outbox", &["id"]);
        for cut in 1..rel.len() {
            assert!(decode(rel.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut bad = insert_bytes(7, &[Some("a")]).to_vec();
        bad[5] = b'X';
        assert!(
            decode(Bytes::from(bad))
                .unwrap_err()
                .0
                .contains("new tuple marker")
        );
        let mut bad = insert_bytes(7, &[Some("a")]).to_vec();
        bad[8] = b'q';
        assert!(
            decode(Bytes::from(bad))
                .unwrap_err()
                .0
                .contains("unknown kind")
        );
        // Random bytes: any result but a panic.
        let mut seed = 0x2545F4914F6CDD1Du64;
        for _ in 0..2000 {
            let len = (seed % 40) as usize;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                v.push((seed & 0xff) as u8);
            }
            if let Some(first) = v.first_mut() {
                *first = [b'R', b'I'][(seed % 2) as usize];
            }
            let _ = decode(Bytes::from(v));
        }
    }

    /// Encodes any message `decode` returns, the way the server does.
    fn encode(msg: &PgOutput) -> Bytes {
        match msg {
            PgOutput::Relation(r) => {
                let columns: Vec<&str> = r.columns.iter().map(String::as_str).collect();
                relation_bytes(r.id, &r.namespace, &r.name, &columns)
            }
            PgOutput::Insert { relation_id, tuple } => {
                let mut b = vec![b'I'];
                b.extend_from_slice(&relation_id.to_be_bytes());
                b.push(b'N');
                b.extend_from_slice(&(tuple.len() as u16).to_be_bytes());
                for column in tuple {
                    match column {
                        Column::Null => b.push(b'n'),
                        Column::Unchanged => b.push(b'u'),
                        Column::Text(v) | Column::Binary(v) => {
                            b.push(if matches!(column, Column::Text(_)) {
                                b't'
                            } else {
                                b'b'
                            });
                            b.extend_from_slice(&(v.len() as u32).to_be_bytes());
                            b.extend_from_slice(v);
                        }
                    }
                }
                Bytes::from(b)
            }
            PgOutput::Other(tag) => Bytes::from(vec![*tag]),
        }
    }

    #[test]
    fn a_length_prefix_of_2_gib_fails_without_allocating_it() {
        // The value's length is checked against the bytes left before
        // anything is taken.
        let mut b = vec![b'I', 0, 0, 0, 7, b'N', 0, 1, b't'];
        b.extend_from_slice(&0x8000_0000u32.to_be_bytes());
        b.extend_from_slice(b"abc");
        let e = decode(Bytes::from(b)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed pgoutput message: truncated column value: need 2147483648 bytes at offset 13, 3 left"
        );
    }

    #[test]
    fn a_made_up_column_count_reserves_no_more_than_the_bytes_left_can_hold() {
        // An 8-byte Insert announcing 65,535 columns used to reserve room
        // for all of them (2 MiB) before finding the first one missing.
        let insert = Bytes::from_static(b"I\0\0\0\x07N\xff\xff");
        let e = decode(insert.clone()).unwrap_err();
        assert!(e.0.contains("truncated column kind"), "{e}");
        let c = Cursor { buf: insert, at: 8 };
        assert_eq!(c.capacity(65_535, 1), 0);
        let relation = relation_bytes(1, "public", "outbox", &["id"]);
        let mut garbled = relation.to_vec();
        let count_at = garbled.len() - 2 - (1 + 3 + 4 + 4);
        garbled[count_at..count_at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        let c = Cursor {
            buf: Bytes::from(garbled.clone()),
            at: count_at + 2,
        };
        assert_eq!(c.capacity(65_535, MIN_RELATION_COLUMN), 1);
        let e = decode(Bytes::from(garbled)).unwrap_err();
        assert!(e.0.contains("truncated column flags"), "{e}");
    }

    fn column() -> impl Strategy<Value = Column> {
        prop_oneof![
            Just(Column::Null),
            Just(Column::Unchanged),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| Column::Text(v.into())),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| Column::Binary(v.into())),
        ]
    }

    fn message() -> impl Strategy<Value = PgOutput> {
        let name = "[^\\x00]{0,12}";
        prop_oneof![
            (
                any::<u32>(),
                name,
                name,
                proptest::collection::vec(name, 0..6)
            )
                .prop_map(|(id, namespace, name, columns)| PgOutput::Relation(
                    Relation {
                        id,
                        namespace,
                        name,
                        columns
                    }
                )),
            (any::<u32>(), proptest::collection::vec(column(), 0..8))
                .prop_map(|(relation_id, tuple)| PgOutput::Insert { relation_id, tuple }),
            any::<u8>()
                .prop_filter("R and I are decoded", |t| *t != b'R' && *t != b'I')
                .prop_map(PgOutput::Other),
        ]
    }

    proptest! {
        #[test]
        fn messages_round_trip(msg in message()) {
            prop_assert_eq!(decode(encode(&msg)).unwrap(), msg);
        }

        #[test]
        fn any_bytes_decode_or_say_what_is_wrong(
            tag in prop_oneof![Just(b'R'), Just(b'I'), any::<u8>()],
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut b = vec![tag];
            b.extend(rest);
            match decode(Bytes::from(b)) {
                Ok(msg) => {
                    // Whatever decodes re-encodes to a message that decodes the same.
                    prop_assert_eq!(decode(encode(&msg)).unwrap(), msg);
                }
                Err(e) => {
                    let text = e.to_string();
                    prop_assert!(
                        ["truncated ", "unterminated ", "new tuple marker", "unknown kind"]
                            .iter()
                            .any(|what| text.contains(what)),
                        "{}", text
                    );
                }
            }
        }

        #[test]
        fn every_cut_of_a_message_is_an_error(msg in message(), cut in any::<prop::sample::Index>()) {
            let bytes = encode(&msg);
            prop_assume!(!matches!(msg, PgOutput::Other(_)));
            let cut = cut.index(bytes.len());
            prop_assert!(decode(bytes.slice(..cut)).is_err());
        }
    }
}
