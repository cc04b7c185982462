//! TLS 1.3 record protection (RFC 8446 §5) for one direction, after rustls finished the
//! handshake. The AEAD work (nonce from IV and sequence number, additional data, inner content
//! type and padding) is rustls's own `MessageEncrypter`/`MessageDecrypter` for the negotiated
//! suite; this module only frames records, counts sequence numbers and parses the few
//! post-handshake messages (KeyUpdate, NewSessionTicket).

use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks,
    OutboundPlainMessage,
};
use rustls::{ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion, Tls13CipherSuite};

/// Record header: type, legacy version, length.
pub(crate) const HEADER: usize = 5;
/// Largest plaintext of one record.
pub(crate) const MAX_PLAIN: usize = 1 << 14;
/// Largest protected payload a peer may send (RFC 8446 §5.2).
pub(crate) const MAX_CIPHER: usize = MAX_PLAIN + 256;

/// Handshake message types seen after the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// A negotiated TLS 1.3 suite, able to key either direction.
#[derive(Clone, Copy)]
pub(crate) struct Suite(pub &'static Tls13CipherSuite);

impl Suite {
    fn key_iv(secrets: ConnectionTrafficSecrets) -> Result<(AeadKey, Iv), Error> {
        match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
            _ => Err(Error::General("unsupported tls 1.3 traffic secrets".into())),
        }
    }

    /// Records protected with `secrets`, the next one numbered `seq`.
    pub fn sealer(self, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Sealer, Error> {
        let (key, iv) = Self::key_iv(secrets)?;
        // rustls updates keys exactly at the suite's limit; do the same, leaving one record
        // under the old key for the KeyUpdate itself.
        let limit = self.0.common.confidentiality_limit.saturating_sub(1);
        Ok(Sealer {
            enc: self.0.aead_alg.encrypter(key, iv),
            seq,
            rekey_at: limit,
        })
    }

    /// Records protected with `secrets`, the next one numbered `seq`.
    pub fn opener(self, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Opener, Error> {
        let (key, iv) = Self::key_iv(secrets)?;
        Ok(Opener {
            dec: self.0.aead_alg.decrypter(key, iv),
            seq,
        })
    }
}

/// The sending direction's keys.
pub(crate) struct Sealer {
    enc: Box<dyn MessageEncrypter>,
    seq: u64,
    /// From this sequence number on the keys must be updated first.
    rekey_at: u64,
}

impl Sealer {
    /// One protected record (header included) holding `plain` (at most [`MAX_PLAIN`]) as `typ`.
    pub fn seal(&mut self, typ: ContentType, plain: &[u8]) -> Result<Vec<u8>, Error> {
        if self.seq >= self.rekey_at.saturating_add(1) {
            return Err(Error::EncryptError);
        }
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(plain),
        };
        let rec = self.enc.encrypt(msg, self.seq)?;
        self.seq += 1;
        Ok(rec.encode())
    }

    /// Whether the next record needs new keys.
    pub fn must_rekey(&self) -> bool {
        self.seq >= self.rekey_at
    }

    /// Lower the update point (tests: exercise key updates without sending terabytes).
    pub fn rekey_every(&mut self, records: u64) {
        self.rekey_at = self.rekey_at.min(records);
    }

    /// A KeyUpdate record under the current keys (`request`: ask the peer to update too).
    pub fn key_update(&mut self, request: bool) -> Result<Vec<u8>, Error> {
        self.seal(
            ContentType::Handshake,
            &[KEY_UPDATE, 0, 0, 1, u8::from(request)],
        )
    }

    /// A close_notify alert record.
    pub fn close_notify(&mut self) -> Result<Vec<u8>, Error> {
        // warning(1), close_notify(0)
        self.seal(ContentType::Alert, &[1, 0])
    }

    /// Switch to the keys after an update; numbering restarts.
    pub fn rekey(
        &mut self,
        suite: Suite,
        seq: u64,
        s: ConnectionTrafficSecrets,
    ) -> Result<(), Error> {
        let next = suite.sealer(seq, s)?;
        self.enc = next.enc;
        self.seq = next.seq;
        // Keep a lowered update point (tests) across updates.
        self.rekey_at = self.rekey_at.min(next.rekey_at);
        Ok(())
    }
}

/// The receiving direction's keys.
pub(crate) struct Opener {
    dec: Box<dyn MessageDecrypter>,
    seq: u64,
}

/// The protected payload length a record header announces, once the header is checked.
pub(crate) fn payload_len(header: &[u8]) -> Result<usize, Error> {
    let (typ, version, len) = match header {
        [t, v0, v1, l0, l1, ..] => (*t, [*v0, *v1], usize::from(u16::from_be_bytes([*l0, *l1]))),
        _ => return Err(Error::General("short record header".into())),
    };
    // After the handshake every record is protected application_data, TLS 1.2 on the wire.
    if typ != u8::from(ContentType::ApplicationData) || version != [3, 3] {
        return Err(Error::General(format!(
            "unexpected record type {typ} version {version:02x?} after the handshake"
        )));
    }
    if len == 0 || len > MAX_CIPHER {
        return Err(Error::PeerSentOversizedRecord);
    }
    Ok(len)
}

impl Opener {
    /// Decrypt the whole record `rec` (header included, checked by [`payload_len`]) in place.
    /// The plaintext is then `rec[HEADER..HEADER + len]`; returns its type and `len`.
    pub fn open(&mut self, rec: &mut [u8]) -> Result<(ContentType, usize), Error> {
        let payload = rec.get_mut(HEADER..).ok_or(Error::DecryptError)?;
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        );
        let plain = self.dec.decrypt(msg, self.seq)?;
        self.seq += 1;
        Ok((plain.typ, plain.payload.len()))
    }

    /// Switch to the keys after the peer's KeyUpdate; numbering restarts.
    pub fn rekey(
        &mut self,
        suite: Suite,
        seq: u64,
        s: ConnectionTrafficSecrets,
    ) -> Result<(), Error> {
        *self = suite.opener(seq, s)?;
        Ok(())
    }
}

/// A post-handshake message from the peer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PostHandshake<'a> {
    /// The peer's keys changed; `true`: it asks us to update ours too.
    KeyUpdate(bool),
    /// A session ticket (body without the message header).
    NewSessionTicket(&'a [u8]),
}

/// The handshake messages of one record; each must be whole (rustls never splits these), and a
/// KeyUpdate must end its record (RFC 8446 §5.1: messages must not span a key change).
pub(crate) fn post_handshake(mut rec: &[u8]) -> Result<Vec<PostHandshake<'_>>, Error> {
    let bad = |what: &str| Error::General(format!("bad post-handshake message: {what}"));
    let mut out = Vec::new();
    while !rec.is_empty() {
        let [typ, a, b, c, rest @ ..] = rec else {
            return Err(bad("short header"));
        };
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if rest.len() < len {
            return Err(bad("split across records"));
        }
        let (body, rest) = rest.split_at(len);
        out.push(match (*typ, body) {
            (KEY_UPDATE, [0 | 1]) if rest.is_empty() => PostHandshake::KeyUpdate(body == [1]),
            (KEY_UPDATE, _) => return Err(bad("key update")),
            (NEW_SESSION_TICKET, _) => PostHandshake::NewSessionTicket(body),
            (t, _) => return Err(bad(&format!("type {t}"))),
        });
        rec = rest;
    }
    if out.is_empty() {
        return Err(bad("empty"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suite() -> Suite {
        Suite(
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384
                .tls13()
                .expect("tls13"),
        )
    }

    fn secrets(b: u8) -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([b; 32]),
            iv: Iv::from([b; 12]),
        }
    }

    #[test]
    fn records_round_trip_and_count() {
        let mut s = suite().sealer(7, secrets(1)).expect("sealer");
        let mut o = suite().opener(7, secrets(1)).expect("opener");
        for msg in [&b"hello"[..], &[0xab; MAX_PLAIN][..]] {
            let mut rec = s.seal(ContentType::ApplicationData, msg).expect("seal");
            let len = payload_len(&rec).expect("header");
            assert_eq!(rec.len(), HEADER + len);
            let (typ, n) = o.open(&mut rec).expect("open");
            assert_eq!(typ, ContentType::ApplicationData);
            assert_eq!(&rec[HEADER..HEADER + n], msg);
        }
    }

    #[test]
    fn tampered_replayed_or_wrongly_keyed_records_fail() {
        let mut s = suite().sealer(0, secrets(1)).expect("sealer");
        let rec = s.seal(ContentType::ApplicationData, b"data").expect("seal");
        let mut o = suite().opener(0, secrets(1)).expect("opener");
        let mut flipped = rec.clone();
        flipped[HEADER + 1] ^= 1;
        assert!(o.open(&mut flipped).is_err(), "a flipped bit fails");
        let mut o = suite().opener(0, secrets(1)).expect("opener");
        o.open(&mut rec.clone()).expect("first");
        assert!(o.open(&mut rec.clone()).is_err(), "a replay fails");
        let mut other = suite().opener(0, secrets(2)).expect("opener");
        assert!(other.open(&mut rec.clone()).is_err(), "another key fails");
    }

    #[test]
    fn headers_are_checked() {
        assert!(payload_len(&[23, 3, 3, 0, 10]).is_ok());
        assert!(
            payload_len(&[22, 3, 3, 0, 10]).is_err(),
            "unprotected handshake"
        );
        assert!(
            payload_len(&[20, 3, 3, 0, 1]).is_err(),
            "change cipher spec"
        );
        assert!(payload_len(&[23, 3, 1, 0, 10]).is_err(), "version");
        assert!(payload_len(&[23, 3, 3, 0, 0]).is_err(), "empty");
        assert!(payload_len(&[23, 3, 3, 0x41, 1]).is_err(), "oversized");
    }

    #[test]
    fn post_handshake_messages_parse_strictly() {
        assert_eq!(
            post_handshake(&[24, 0, 0, 1, 1]).expect("ku"),
            vec![PostHandshake::KeyUpdate(true)]
        );
        assert!(post_handshake(&[24, 0, 0, 1, 2]).is_err());
        assert!(
            post_handshake(&[24, 0, 0, 1, 0, 4, 0, 0, 0]).is_err(),
            "data after ku"
        );
        assert!(post_handshake(&[4, 0, 0, 9, 1]).is_err(), "split");
        assert!(
            post_handshake(&[13, 0, 0, 0]).is_err(),
            "certificate request"
        );
        assert!(post_handshake(&[]).is_err());
    }
}
