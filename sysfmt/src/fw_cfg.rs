//! A QEMU fw_cfg entry as the `qemu_fw_cfg` kernel module shows it:
//! `/sys/firmware/qemu_fw_cfg/by_name/<name>/{size,raw}`. The size is read first
//! and checked against a limit before `raw` is touched, then `raw` is read in one
//! read of exactly that size (each sysfs read of an entry costs time in proportion
//! to its offset).

/// Where the kernel module shows fw_cfg.
pub const SYSFS_ROOT: &str = "/sys/firmware/qemu_fw_cfg";
/// Our identity entry, as given to QEMU with `-fw_cfg name=opt/org.powernode/identity,...`.
pub const IDENTITY_ENTRY: &str = "opt/org.powernode/identity";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("fw_cfg entry size {0:?} is not a number")]
    NotANumber(String),
    #[error("fw_cfg entry is {size} bytes, more than the {max} allowed")]
    TooLarge { size: u64, max: usize },
}

/// The entry's `size` file (a decimal number and a newline), at most `max`.
pub fn parse_size(text: &str, max: usize) -> Result<usize, SizeError> {
    let trimmed = text.trim();
    let size: u64 = trimmed
        .parse()
        .map_err(|_| SizeError::NotANumber(trimmed.chars().take(32).collect()))?;
    match usize::try_from(size) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(SizeError::TooLarge { size, max }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1234\n", 4096), Ok(1234));
        assert_eq!(parse_size("0", 4096), Ok(0));
        assert_eq!(parse_size("4096", 4096), Ok(4096));
        assert_eq!(
            parse_size("4097", 4096),
            Err(SizeError::TooLarge {
                size: 4097,
                max: 4096
            })
        );
        assert_eq!(
            parse_size("99999999999999999999", 4096),
            Err(SizeError::NotANumber("99999999999999999999".into()))
        );
        assert_eq!(
            parse_size(" -1 ", 4096),
            Err(SizeError::NotANumber("-1".into()))
        );
        assert_eq!(
            parse_size("", 4096),
            Err(SizeError::NotANumber(String::new()))
        );
        let long = "x".repeat(100);
        assert_eq!(
            parse_size(&long, 1),
            Err(SizeError::NotANumber("x".repeat(32)))
        );
    }
}
