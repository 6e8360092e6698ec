//! Tar framing for the node's unpacker: headers (checksummed), GNU long names and
//! links, PAX records, content padded to 512-byte blocks, the end of the archive. It
//! hands out each member's content as slices of the stream's own buffers, and says
//! nothing about what a member means to the tree (that is [`crate::unpack`]).
//!
//! [`TarMember`] is what the unpacker and the publisher's TOC read of a member, so both
//! see the same header whether it came through [`Members`] or the tar crate.

use std::borrow::Cow;
use std::io::{self, BufRead, Read};

/// What the unpacker's `raw_meta_of` and `kind_of` read of a tar member: the tar
/// crate's entries (the publisher's TOC) and [`Member`]s (the node's unpacker) alike.
pub(crate) trait TarMember {
    fn header(&self) -> &tar::Header;
    /// Content size (a PAX `size` record wins over the header).
    fn size(&self) -> u64;
    fn link_name_bytes(&self) -> Option<Cow<'_, [u8]>>;
    fn pax_extensions(&mut self) -> io::Result<Option<tar::PaxExtensions<'_>>>;
}

impl<R: Read> TarMember for tar::Entry<'_, R> {
    fn header(&self) -> &tar::Header {
        tar::Entry::header(self)
    }
    fn size(&self) -> u64 {
        tar::Entry::size(self)
    }
    fn link_name_bytes(&self) -> Option<Cow<'_, [u8]>> {
        tar::Entry::link_name_bytes(self)
    }
    fn pax_extensions(&mut self) -> io::Result<Option<tar::PaxExtensions<'_>>> {
        tar::Entry::pax_extensions(self)
    }
}

/// One tar member as [`Members`] frames it: its header, with the GNU long name / long
/// link and PAX records that came before it.
#[derive(Debug)]
pub(crate) struct Member {
    header: tar::Header,
    size: u64,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

/// The value of the first well-formed PAX record named `key`.
fn pax_value<'a>(pax: &'a Option<Vec<u8>>, key: &[u8]) -> Option<&'a [u8]> {
    tar::PaxExtensions::new(pax.as_deref()?)
        .filter_map(|f| f.ok())
        .find(|f| f.key_bytes() == key)
        .map(|f| f.value_bytes())
}

/// A GNU long name or link, without its trailing NUL.
fn strip_nul(b: &[u8]) -> &[u8] {
    b.strip_suffix(&[0]).unwrap_or(b)
}

impl Member {
    /// GNU long name, else PAX `path`, else the header's (ustar prefix included).
    pub(crate) fn path_bytes(&self) -> Cow<'_, [u8]> {
        if let Some(b) = &self.long_name {
            return Cow::Borrowed(strip_nul(b));
        }
        match pax_value(&self.pax, b"path") {
            Some(v) => Cow::Borrowed(v),
            None => self.header.path_bytes(),
        }
    }
}

impl TarMember for Member {
    fn header(&self) -> &tar::Header {
        &self.header
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn link_name_bytes(&self) -> Option<Cow<'_, [u8]>> {
        if let Some(b) = &self.long_link {
            return Some(Cow::Borrowed(strip_nul(b)));
        }
        match pax_value(&self.pax, b"linkpath") {
            Some(v) => Some(Cow::Borrowed(v)),
            None => self.header.link_name_bytes(),
        }
    }
    fn pax_extensions(&mut self) -> io::Result<Option<tar::PaxExtensions<'_>>> {
        Ok(self.pax.as_deref().map(tar::PaxExtensions::new))
    }
}

fn framing(msg: &str) -> io::Error {
    io::Error::other(msg.to_string())
}

/// Largest GNU long name / long link / PAX extension member read. Real ones hold a
/// path (4 KiB on Linux) or a few records with xattrs (64 KiB each at most); one
/// larger is an attempt to make the node read it into memory.
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// Tar framing over a [`BufRead`], so a member's content can be handed to the store
/// as slices of the stream's own buffers (the tar crate's entries only `Read`, which
/// costs a copy of every byte). The framing is the tar crate's, step for step
/// (`Entries::next` without `raw` or `ignore_zeros`): headers checksummed, GNU long
/// names / links and PAX local records attached to the member they precede, a PAX
/// `size` winning over the header's, content padded to 512 bytes, the archive ending
/// at the first all-zero block or at EOF; the publisher's TOC (built with the tar
/// crate) and this agree on every member.
pub(crate) struct Members<R> {
    inner: R,
    /// Bytes consumed so far, and where the next header starts.
    pos: u64,
    next: u64,
}

const TAR_BLOCK: u64 = 512;

impl<R: BufRead> Members<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            pos: 0,
            next: 0,
        }
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    /// Consumes `n` bytes (the rest of a member's content and its padding).
    fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            let buf = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                return Err(framing("unexpected EOF during skip"));
            }
            let k = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.inner.consume(k);
            self.pos += k as u64;
            n -= k as u64;
        }
        Ok(())
    }

    /// A whole block; `false` at a clean EOF, an error at a partial block.
    fn read_block(&mut self, block: &mut [u8]) -> io::Result<bool> {
        let mut read = 0;
        while read < block.len() {
            let buf = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if buf.is_empty() {
                if read == 0 {
                    return Ok(false);
                }
                return Err(framing("failed to read entire block"));
            }
            let k = buf.len().min(block.len() - read);
            block[read..read + k].copy_from_slice(&buf[..k]);
            self.inner.consume(k);
            self.pos += k as u64;
            read += k;
        }
        Ok(true)
    }

    /// The next header (extension headers included), its PAX `size` applied from
    /// `pax`, which describes the member after the extension headers.
    fn next_raw(&mut self, pax: Option<&[u8]>) -> io::Result<Option<Member>> {
        let delta = self.next - self.pos;
        self.skip(delta)?;
        let mut header = tar::Header::new_old();
        if !self.read_block(header.as_mut_bytes())? {
            return Ok(None);
        }
        if header.as_bytes().iter().all(|&b| b == 0) {
            return Ok(None);
        }
        self.next = self.pos;
        let bytes = header.as_bytes();
        let sum = bytes[..148]
            .iter()
            .chain(&bytes[156..])
            .fold(0u32, |a, &b| a + u32::from(b))
            + 8 * 32;
        if sum != header.cksum()? {
            return Err(framing("archive header checksum mismatch"));
        }
        let t = header.entry_type();
        let extension = t.is_gnu_longname()
            || t.is_gnu_longlink()
            || t.is_pax_local_extensions()
            || t.is_pax_global_extensions();
        let mut size = header.entry_size()?;
        if let Some(pax) = pax.filter(|_| !extension) {
            // As the tar crate: the first `size` record, if it is a number.
            let record = tar::PaxExtensions::new(pax)
                .map_while(|f| f.ok())
                .find(|f| f.key() == Ok("size"));
            if let Some(v) = record
                .and_then(|f| f.value().ok())
                .and_then(|v| v.parse::<u64>().ok())
            {
                size = v;
            }
        }
        let padded = size
            .checked_add(TAR_BLOCK - 1)
            .ok_or_else(|| framing("size overflow"))?
            & !(TAR_BLOCK - 1);
        self.next = self
            .next
            .checked_add(padded)
            .ok_or_else(|| framing("size overflow"))?;
        Ok(Some(Member {
            header,
            size,
            long_name: None,
            long_link: None,
            pax: None,
        }))
    }

    /// An extension member's content, read whole (at most its size).
    fn read_all(&mut self, size: u64) -> io::Result<Vec<u8>> {
        let mut v = Vec::with_capacity(usize::try_from(size.min(128 << 10)).unwrap_or(0));
        self.content(size).read_to_end(&mut v)?;
        Ok(v)
    }

    /// The next member, with the extension headers before it applied; `None` at the
    /// end of the archive.
    pub(crate) fn next_member(&mut self) -> io::Result<Option<Member>> {
        let mut long_name = None;
        let mut long_link = None;
        let mut pax: Option<Vec<u8>> = None;
        let mut processed = 0;
        loop {
            processed += 1;
            let Some(mut member) = self.next_raw(pax.as_deref())? else {
                if processed > 1 {
                    return Err(framing(
                        "members found describing a future member but no future member found",
                    ));
                }
                return Ok(None);
            };
            let h = &member.header;
            let recognized = h.as_gnu().is_some() || h.as_ustar().is_some();
            let t = h.entry_type();
            let slot = match () {
                _ if recognized && t.is_gnu_longname() => &mut long_name,
                _ if recognized && t.is_gnu_longlink() => &mut long_link,
                _ if recognized && t.is_pax_local_extensions() => &mut pax,
                _ => {
                    member.long_name = long_name;
                    member.long_link = long_link;
                    member.pax = pax;
                    return Ok(Some(member));
                }
            };
            if slot.is_some() {
                return Err(framing(
                    "two extension entries of one kind describing the same member",
                ));
            }
            if member.size > MAX_EXTENSION_BYTES {
                return Err(io::Error::other(crate::error::CodedStreamError {
                    code: powernode_proto::ErrorCode::LayerTooLarge,
                    message: format!(
                        "a tar extension header of {} bytes (at most {MAX_EXTENSION_BYTES})",
                        member.size
                    ),
                }));
            }
            *slot = Some(self.read_all(member.size)?);
        }
    }

    /// The content of the member just returned: at most `size` bytes, straight from
    /// the stream's buffers.
    pub(crate) fn content(&mut self, size: u64) -> MemberContent<'_, R> {
        MemberContent {
            members: self,
            left: size,
        }
    }
}

/// One member's content (see [`Members::content`]).
pub(crate) struct MemberContent<'m, R> {
    members: &'m mut Members<R>,
    left: u64,
}

impl<R: BufRead> Read for MemberContent<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let buf = self.fill_buf()?;
        let n = buf.len().min(out.len());
        out[..n].copy_from_slice(&buf[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for MemberContent<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.left == 0 {
            return Ok(&[]);
        }
        let left = usize::try_from(self.left).unwrap_or(usize::MAX);
        let buf = self.members.inner.fill_buf()?;
        Ok(&buf[..buf.len().min(left)])
    }

    fn consume(&mut self, n: usize) {
        self.members.inner.consume(n);
        self.members.pos += n as u64;
        self.left -= n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one framing saw of each member.
    #[derive(Debug, PartialEq)]
    struct Seen {
        path: Vec<u8>,
        link: Option<Vec<u8>>,
        kind: u8,
        size: u64,
        pax: Vec<(Vec<u8>, Vec<u8>)>,
        content: Vec<u8>,
    }

    fn pax_list(p: Option<tar::PaxExtensions<'_>>) -> Vec<(Vec<u8>, Vec<u8>)> {
        p.into_iter()
            .flatten()
            .flatten()
            .map(|e| (e.key_bytes().to_vec(), e.value_bytes().to_vec()))
            .collect()
    }

    fn with_tar_crate(bytes: &[u8]) -> io::Result<Vec<Seen>> {
        let mut a = tar::Archive::new(bytes);
        let mut out = Vec::new();
        for e in a.entries()? {
            let mut e = e?;
            let mut seen = Seen {
                path: e.path_bytes().into_owned(),
                link: e.link_name_bytes().map(|l| l.into_owned()),
                kind: e.header().entry_type().as_byte(),
                size: e.size(),
                pax: pax_list(e.pax_extensions()?),
                content: Vec::new(),
            };
            e.read_to_end(&mut seen.content)?;
            out.push(seen);
        }
        Ok(out)
    }

    /// Through [`Members`], read in small pieces so buffers split everywhere.
    fn with_members(bytes: &[u8], piece: usize) -> io::Result<Vec<Seen>> {
        let mut m = Members::new(io::BufReader::with_capacity(piece, bytes));
        let mut out = Vec::new();
        while let Some(mut e) = m.next_member()? {
            let mut seen = Seen {
                path: e.path_bytes().into_owned(),
                link: TarMember::link_name_bytes(&e).map(|l| l.into_owned()),
                kind: e.header.entry_type().as_byte(),
                size: e.size,
                pax: pax_list(TarMember::pax_extensions(&mut e)?),
                content: Vec::new(),
            };
            m.content(e.size).read_to_end(&mut seen.content)?;
            out.push(seen);
        }
        Ok(out)
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(7);
        h
    }

    fn sample() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/file", "d".repeat(150));
        let data = crate::testutil::pseudo_random(70_001, 4);
        b.append_data(
            &mut header(tar::EntryType::Regular, 70_001),
            &long,
            &data[..],
        )
        .unwrap();
        b.append_data(&mut header(tar::EntryType::Regular, 0), "empty", &b""[..])
            .unwrap();
        let target = format!("{}/target", "t".repeat(120));
        b.append_link(&mut header(tar::EntryType::Symlink, 0), "sym", &target)
            .unwrap();
        b.append_pax_extensions([
            ("SCHILY.xattr.user.k", &b"v\0x"[..]),
            ("path", &b"pax/named"[..]),
            ("mtime", &b"12.5"[..]),
        ])
        .unwrap();
        b.append_data(
            &mut header(tar::EntryType::Regular, 3),
            "ignored",
            &b"abc"[..],
        )
        .unwrap();
        b.append_data(&mut header(tar::EntryType::Directory, 0), "dir/", &b""[..])
            .unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn members_frame_as_the_tar_crate_does() {
        let tar = sample();
        let expected = with_tar_crate(&tar).unwrap();
        assert_eq!(expected.len(), 5, "{expected:?}");
        assert_eq!(expected[3].path, b"pax/named");
        for piece in [1, 7, 512, 4096, 1 << 20] {
            assert_eq!(
                with_members(&tar, piece).unwrap(),
                expected,
                "piece {piece}"
            );
        }
        // No end blocks, trailing garbage after them, a cut inside a header or inside
        // content: the same verdicts (cut content reads short, as with the tar crate).
        let mut no_end = tar.clone();
        no_end.truncate(tar.len() - 1024);
        let mut garbage = tar.clone();
        garbage.extend_from_slice(b"trailing bytes after the end");
        for bytes in [no_end, garbage, tar[..700].to_vec(), tar[..70_000].to_vec()] {
            let a = with_tar_crate(&bytes).map_err(|e| e.to_string());
            let b = with_members(&bytes, 4096).map_err(|e| e.to_string());
            assert_eq!(a.is_ok(), b.is_ok(), "{a:?} vs {b:?}");
            if let (Ok(a), Ok(b)) = (a, b) {
                assert_eq!(a, b);
            }
        }
        // A checksum broken by one flipped byte is refused.
        let mut bad = tar.clone();
        bad[1100] ^= 1;
        assert!(with_tar_crate(&bad).is_err());
        assert!(with_members(&bad, 4096).is_err());
    }

    #[test]
    fn a_pax_size_record_wins_over_the_header() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("size", &b"5"[..])]).unwrap();
        // The header says 3, the PAX record 5: both readers take 5 bytes.
        let mut h = header(tar::EntryType::Regular, 3);
        h.set_path("f").unwrap();
        h.set_cksum();
        let mut raw = b.into_inner().unwrap();
        // Without the end-of-archive blocks `into_inner` adds.
        raw.truncate(raw.len() - 1024);
        raw.extend_from_slice(h.as_bytes());
        let mut content = b"abcde".to_vec();
        content.resize(512, 0);
        raw.extend_from_slice(&content);
        raw.extend_from_slice(&[0u8; 1024]);
        let expected = with_tar_crate(&raw).unwrap();
        assert_eq!(expected[0].content, b"abcde");
        assert_eq!(with_members(&raw, 64).unwrap(), expected);
    }
}
