//! TLS 1.3 record protection (RFC 8446 §5) for one direction, after rustls finished the
//! handshake: frames records, counts sequence numbers, does the AEAD (nonce from IV and sequence
//! number, the header as additional data, inner content type and padding) and parses the few
//! post-handshake messages (KeyUpdate, NewSessionTicket).
//!
//! The AEAD is aws-lc's out-of-place seal and open, not rustls's `MessageEncrypter`:
//! that one allocates each record and copies the plaintext into it, where [`Sealer::seal_from`]
//! encrypts the plaintext (guest memory) straight into the caller's output buffer and
//! [`Opener::open_to`] decrypts straight into the caller's memory: no copy, no allocation.

use rustls::crypto::cipher::{Iv, Nonce};
use rustls::{ConnectionTrafficSecrets, ContentType, Error, Tls13CipherSuite};

/// The crypto library doing the AEAD: the same one as rustls's provider (`tls::provider`).
use aws_lc_rs::aead;

/// Record header: type, legacy version, length.
pub(crate) const HEADER: usize = 5;
/// Largest plaintext of one record.
pub(crate) const MAX_PLAIN: usize = 1 << 14;
/// Largest protected payload a peer may send (RFC 8446 §5.2).
pub(crate) const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// Authentication tag of every TLS 1.3 suite.
const TAG: usize = 16;
/// What protection adds to a record's plaintext: header, inner content type, tag.
pub(crate) const OVERHEAD: usize = HEADER + 1 + TAG;

/// Handshake message types seen after the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// A negotiated TLS 1.3 suite, able to key either direction.
#[derive(Clone, Copy)]
pub(crate) struct Suite(pub &'static Tls13CipherSuite);

/// One direction's AEAD key and static IV.
struct Keys {
    key: aead::LessSafeKey,
    iv: Iv,
}

impl Keys {
    fn new(secrets: ConnectionTrafficSecrets) -> Result<Self, Error> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(Error::General("unsupported tls 1.3 traffic secrets".into())),
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| Error::General("tls 1.3 traffic key of the wrong length".into()))?;
        Ok(Keys {
            key: aead::LessSafeKey::new(key),
            iv,
        })
    }

    /// RFC 8446 §5.3: the IV xor the sequence number.
    fn nonce(&self, seq: u64) -> aead::Nonce {
        aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0)
    }
}

impl Suite {
    /// Records protected with `secrets`, the next one numbered `seq`.
    pub fn sealer(self, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Sealer, Error> {
        // rustls updates keys exactly at the suite's limit; do the same, leaving one record
        // under the old key for the KeyUpdate itself.
        let limit = self.0.common.confidentiality_limit.saturating_sub(1);
        Ok(Sealer {
            keys: Keys::new(secrets)?,
            seq,
            rekey_at: limit,
        })
    }

    /// Records protected with `secrets`, the next one numbered `seq`.
    pub fn opener(self, seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Opener, Error> {
        Ok(Opener {
            keys: Keys::new(secrets)?,
            seq,
        })
    }
}

/// The sending direction's keys.
pub(crate) struct Sealer {
    keys: Keys,
    seq: u64,
    /// From this sequence number on the keys must be updated first.
    rekey_at: u64,
}

impl Sealer {
    /// Seal `plain` (at most [`MAX_PLAIN`] bytes) as one record of type `typ` into
    /// `out[..plain.len() + OVERHEAD]`, out of place: `plain` is only read, by the AEAD itself,
    /// so it can be guest memory and the AEAD is the only pass over it. Returns the record's
    /// length.
    pub fn seal_from(
        &mut self,
        typ: ContentType,
        plain: &[u8],
        out: &mut [u8],
    ) -> Result<usize, Error> {
        if self.seq >= self.rekey_at.saturating_add(1) {
            return Err(Error::EncryptError);
        }
        let n = plain.len();
        let len = n + OVERHEAD;
        if n > MAX_PLAIN || out.len() < len {
            return Err(Error::General("record larger than its buffer".into()));
        }
        let (header, body) = out[..len].split_at_mut(HEADER);
        let wire = u16::try_from(len - HEADER).map_err(|_| Error::EncryptError)?;
        // After the handshake every record is application_data, TLS 1.2 on the wire.
        header[0] = ContentType::ApplicationData.into();
        header[1..3].copy_from_slice(&[3, 3]);
        header[3..5].copy_from_slice(&wire.to_be_bytes());
        let (cipher, type_and_tag) = body.split_at_mut(n);
        // The inner content type follows the content (RFC 8446 §5.2), encrypted with it.
        self.keys
            .key
            .seal_out_of_place_scatter(
                self.keys.nonce(self.seq),
                aead::Aad::from(&*header),
                plain,
                cipher,
                &[typ.into()],
                type_and_tag,
            )
            .map_err(|_| Error::EncryptError)?;
        self.seq += 1;
        Ok(len)
    }

    /// One protected record (header included) holding `plain` (at most [`MAX_PLAIN`]) as `typ`.
    pub fn seal(&mut self, typ: ContentType, plain: &[u8]) -> Result<Vec<u8>, Error> {
        let mut rec = vec![0; plain.len() + OVERHEAD];
        self.seal_from(typ, plain, &mut rec)?;
        Ok(rec)
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
        self.keys = next.keys;
        self.seq = next.seq;
        // Keep a lowered update point (tests) across updates.
        self.rekey_at = self.rekey_at.min(next.rekey_at);
        Ok(())
    }
}

/// The receiving direction's keys.
pub(crate) struct Opener {
    keys: Keys,
    seq: u64,
}

/// The length of the inner plaintext (content, type, padding) of a record whose header announced
/// `payload` bytes (see [`payload_len`]).
pub(crate) fn inner_len(payload: usize) -> usize {
    payload.saturating_sub(TAG)
}

/// RFC 8446 §5.4: the inner plaintext is the content, its type, then zero padding.
fn inner_type(inner: &[u8]) -> Result<(ContentType, usize), Error> {
    let Some(at) = inner.iter().rposition(|b| *b != 0) else {
        return Err(Error::General("tls record without a content type".into()));
    };
    if at > MAX_PLAIN {
        return Err(Error::PeerSentOversizedRecord);
    }
    Ok((ContentType::from(inner[at]), at))
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
        if rec.len() < HEADER + 1 + TAG {
            return Err(Error::DecryptError);
        }
        let (header, payload) = rec.split_at_mut(HEADER);
        let aad =
            aead::Aad::from(<[u8; HEADER]>::try_from(&*header).map_err(|_| Error::DecryptError)?);
        let inner = self
            .keys
            .key
            .open_in_place(self.keys.nonce(self.seq), aad, payload)
            .map_err(|_| Error::DecryptError)?;
        self.seq += 1;
        inner_type(inner)
    }

    /// Decrypt the whole record `rec` (header included, checked by [`payload_len`]) into `out`,
    /// which must be [`inner_len`] long: the content lands at its start, followed by its type
    /// and any padding. Returns the type and the content's length. On failure `out` holds
    /// garbage (the caller drops the connection and what it was reading into).
    pub fn open_to(&mut self, rec: &[u8], out: &mut [u8]) -> Result<(ContentType, usize), Error> {
        let (header, payload) = rec.split_at_checked(HEADER).ok_or(Error::DecryptError)?;
        let (cipher, tag) = payload
            .split_at_checked(payload.len().saturating_sub(TAG))
            .ok_or(Error::DecryptError)?;
        if cipher.is_empty() || out.len() != cipher.len() {
            return Err(Error::DecryptError);
        }
        let aad = aead::Aad::from(header);
        self.keys
            .key
            .open_separate_gather(self.keys.nonce(self.seq), aad, cipher, tag, out)
            .map_err(|_| Error::DecryptError)?;
        self.seq += 1;
        inner_type(out)
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
    use rustls::crypto::cipher::{
        AeadKey, InboundOpaqueMessage, OutboundChunks, OutboundPlainMessage,
    };
    use rustls::ProtocolVersion;

    fn suite() -> Suite {
        Suite(
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384
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
    fn records_interoperate_with_rustls() {
        // rustls's own record protection for the same suite and keys: the peer is any TLS stack.
        let aead = suite().0.aead_alg;
        let mut ours = suite().sealer(3, secrets(4)).expect("sealer");
        let mut theirs = aead.decrypter(AeadKey::from([4; 32]), Iv::from([4; 12]));
        let mut rec = ours
            .seal(ContentType::ApplicationData, b"to rustls")
            .expect("seal");
        let msg = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut rec[HEADER..],
        );
        let plain = theirs.decrypt(msg, 3).expect("rustls opens ours");
        assert_eq!(
            (plain.typ, plain.payload),
            (ContentType::ApplicationData, &b"to rustls"[..])
        );

        let mut enc = aead.encrypter(AeadKey::from([5; 32]), Iv::from([5; 12]));
        let msg = OutboundPlainMessage {
            typ: ContentType::Handshake,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(b"from rustls"),
        };
        let mut rec = enc.encrypt(msg, 9).expect("encrypt").encode();
        let mut o = suite().opener(9, secrets(5)).expect("opener");
        let (typ, n) = o.open(&mut rec).expect("we open rustls's");
        assert_eq!(
            (typ, &rec[HEADER..HEADER + n]),
            (ContentType::Handshake, &b"from rustls"[..])
        );
    }

    #[test]
    fn records_open_into_another_buffer() {
        let mut s = suite().sealer(0, secrets(1)).expect("sealer");
        let mut o = suite().opener(0, secrets(1)).expect("opener");
        let msg = [0xcd; 1000];
        let rec = s.seal(ContentType::ApplicationData, &msg).expect("seal");
        let mut out = vec![0; inner_len(payload_len(&rec).expect("header"))];
        let (typ, n) = o.open_to(&rec, &mut out).expect("open");
        assert_eq!((typ, &out[..n]), (ContentType::ApplicationData, &msg[..]));
        let mut rec = s.seal(ContentType::ApplicationData, &msg).expect("seal");
        assert!(o.open_to(&rec, &mut out[..10]).is_err(), "wrong size");
        rec[HEADER] ^= 1;
        assert!(o.open_to(&rec, &mut out).is_err(), "a flipped bit fails");
        assert!(
            o.open_to(&rec[..HEADER + 16], &mut []).is_err(),
            "no ciphertext"
        );
    }

    #[test]
    fn padding_is_stripped_and_a_missing_type_fails() {
        let mut s = suite().sealer(0, secrets(1)).expect("sealer");
        let mut o = suite().opener(0, secrets(1)).expect("opener");
        // Inner plaintext "x", type application_data (23), two zeros of padding: sealed as the
        // content of a record whose own type byte is the last zero.
        let mut rec = s.seal(ContentType::from(0), &[b'x', 23, 0]).expect("seal");
        let (typ, n) = o.open(&mut rec).expect("open");
        assert_eq!(
            (typ, &rec[HEADER..HEADER + n]),
            (ContentType::ApplicationData, &b"x"[..])
        );
        let mut rec = s.seal(ContentType::from(0), &[0, 0]).expect("seal");
        assert!(o.open(&mut rec).is_err(), "all padding, no type");
        assert!(
            o.open(&mut [23, 3, 3, 0, 4, 1, 2, 3, 4]).is_err(),
            "shorter than a tag"
        );
    }

    #[test]
    fn seal_from_checks_its_buffer() {
        let mut s = suite().sealer(0, secrets(1)).expect("sealer");
        let mut out = [0u8; 10 + OVERHEAD - 1];
        let r = s.seal_from(ContentType::ApplicationData, &[0; 10], &mut out);
        assert!(r.is_err(), "too small");
        let mut out = vec![0u8; MAX_PLAIN + 1 + OVERHEAD];
        let r = s.seal_from(
            ContentType::ApplicationData,
            &out.clone()[..MAX_PLAIN + 1],
            &mut out,
        );
        assert!(r.is_err(), "oversized");
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
