//! Just enough of a BTF reader to find where a struct member lives. The classic-tracepoint
//! fallback for process attribution needs the offset of the socket cookie in `struct sock`,
//! and aya keeps its own BTF member lookups private.

/// The running kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF (bad magic or header)")]
    Header,
    #[error("BTF type section is truncated or malformed")]
    Truncated,
    #[error("BTF type kind {0} is unknown")]
    Kind(u32),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn name_at(strings: &[u8], off: u32) -> Option<&[u8]> {
    let s = strings.get(off as usize..)?;
    Some(&s[..s.iter().position(|&c| c == 0)?])
}

/// Bytes of kind-specific data after each 12-byte type record.
fn trailing(kind: u32, vlen: usize) -> Result<usize, BtfError> {
    Ok(match kind {
        1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
        3 => 12,                      // ARRAY
        4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
        6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        other => return Err(BtfError::Kind(other)),
    })
}

/// Byte offset of `member` in the struct named `name`, from raw little-endian BTF (e.g.
/// `/sys/kernel/btf/vmlinux`). `Ok(None)` when there is no such struct or member.
pub fn member_offset(btf: &[u8], name: &str, member: &str) -> Result<Option<u32>, BtfError> {
    if btf.len() < 24 || u16::from_le_bytes([btf[0], btf[1]]) != MAGIC {
        return Err(BtfError::Header);
    }
    let field = |at| u32_at(btf, at).ok_or(BtfError::Header).map(|v| v as usize);
    let (hdr_len, type_off, type_len, str_off, str_len) =
        (field(4)?, field(8)?, field(12)?, field(16)?, field(20)?);
    let section = |off: usize, len: usize| {
        btf.get(hdr_len + off..hdr_len + off + len)
            .ok_or(BtfError::Truncated)
    };
    let (types, strings) = (section(type_off, type_len)?, section(str_off, str_len)?);

    let mut at = 0;
    while at < types.len() {
        let (name_off, info) = (
            u32_at(types, at).ok_or(BtfError::Truncated)?,
            u32_at(types, at + 4).ok_or(BtfError::Truncated)?,
        );
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        let members = at + 12;
        if kind == KIND_STRUCT && name_at(strings, name_off) == Some(name.as_bytes()) {
            let bitfields = info >> 31 == 1;
            for i in 0..vlen {
                let m = members + 12 * i;
                let m_name = u32_at(types, m).ok_or(BtfError::Truncated)?;
                if name_at(strings, m_name) == Some(member.as_bytes()) {
                    let raw = u32_at(types, m + 8).ok_or(BtfError::Truncated)?;
                    let bits = if bitfields { raw & 0x00ff_ffff } else { raw };
                    return Ok(Some(bits / 8));
                }
            }
        }
        at = members + trailing(kind, vlen)?;
    }
    Ok(None)
}

/// Where the socket cookie lives in `struct sock`: `sk_cookie` is a macro for
/// `__sk_common.skc_cookie`.
pub fn socket_cookie_offset(btf: &[u8]) -> Result<Option<u32>, BtfError> {
    let (Some(common), Some(cookie)) = (
        member_offset(btf, "sock", "__sk_common")?,
        member_offset(btf, "sock_common", "skc_cookie")?,
    ) else {
        return Ok(None);
    };
    Ok(Some(common + cookie))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with an INT and one struct `sock { int a; long sk_cookie; }`.
    fn sample(kind_flag: bool) -> Vec<u8> {
        let strings = b"\0int\0sock\0a\0sk_cookie\0";
        let mut types = Vec::new();
        let mut push = |v: u32| types.extend(v.to_le_bytes());
        // [1] INT "int" size 4, encoding word.
        push(1);
        push(1 << 24);
        push(4);
        push(32);
        // [2] STRUCT "sock", two members, size 16.
        push(5);
        push(KIND_STRUCT << 24 | 2 | u32::from(kind_flag) << 31);
        push(16);
        push(10); // "a"
        push(1);
        push(0);
        push(12); // "sk_cookie"
        push(1);
        push(64);
        let mut blob = Vec::new();
        blob.extend(MAGIC.to_le_bytes());
        blob.extend([1, 0]);
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            blob.extend(v.to_le_bytes());
        }
        blob.extend(&types);
        blob.extend(strings);
        blob
    }

    #[test]
    fn finds_members() {
        for kind_flag in [false, true] {
            let btf = sample(kind_flag);
            assert_eq!(member_offset(&btf, "sock", "sk_cookie"), Ok(Some(8)));
            assert_eq!(member_offset(&btf, "sock", "a"), Ok(Some(0)));
            assert_eq!(member_offset(&btf, "sock", "nope"), Ok(None));
            assert_eq!(member_offset(&btf, "nope", "a"), Ok(None));
        }
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        let btf = sample(false);
        assert_eq!(member_offset(b"", "sock", "a"), Err(BtfError::Header));
        assert_eq!(
            member_offset(&[0u8; 64], "sock", "a"),
            Err(BtfError::Header)
        );
        for cut in 24..btf.len() {
            // Any prefix: an error or an answer, never a panic or an out-of-bounds read.
            let _ = member_offset(&btf[..cut], "sock", "sk_cookie");
        }
    }

    #[test]
    fn this_kernel_has_a_socket_cookie() {
        let Ok(btf) = std::fs::read(VMLINUX) else {
            return; // No kernel BTF here: nothing to check.
        };
        let offset = socket_cookie_offset(&btf)
            .unwrap()
            .expect("sock_common.skc_cookie");
        assert!(
            offset > 0 && offset.is_multiple_of(8) && offset < 4096,
            "offset {offset}"
        );
    }
}
