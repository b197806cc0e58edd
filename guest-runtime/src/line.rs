//! A line of text formatted into a fixed buffer.

use core::fmt;

/// Text written with `write!` into `N` bytes, never allocating: a panic
/// report must not need the heap, since the panic may be that the heap ran
/// out. What does not fit is cut at a character boundary.
pub struct Line<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Line<N> {
    pub const fn new() -> Self {
        Line { bytes: [0; N], len: 0 }
    }

    /// What has been written, as far as it fit.
    pub fn as_str(&self) -> &str {
        let written = self.bytes.get(..self.len).unwrap_or_default();
        // Only whole `&str` characters are ever copied in, so this cannot
        // fail; an empty line is the answer if it somehow did.
        core::str::from_utf8(written).unwrap_or_default()
    }
}

impl<const N: usize> fmt::Write for Line<N> {
    /// Takes what fits and drops the rest without an error, so the
    /// formatting goes on (an error would stop it and lose nothing more).
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let room = N - self.len;
        let mut take = text.len().min(room);
        while !text.is_char_boundary(take) {
            take -= 1;
        }
        if let (Some(to), Some(from)) = (self.bytes.get_mut(self.len..self.len + take), text.get(..take)) {
            to.copy_from_slice(from.as_bytes());
            self.len += take;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use core::fmt::Write;

    use super::Line;

    #[test]
    fn what_fits_is_kept_whole() {
        let (file, at, message) = ("src/lib.rs", 7, "boom");
        let mut line = Line::<32>::new();
        let _ = write!(line, "panicked at {file}:{at}:\n{message}");
        assert_eq!(line.as_str(), "panicked at src/lib.rs:7:\nboom");
    }

    #[test]
    fn what_does_not_fit_is_cut_at_a_character_boundary() {
        // 8 bytes hold "ab€€" (a "€" is 3 bytes); then nothing more fits.
        let mut line = Line::<8>::new();
        for piece in ["ab", "€€", "€", "c"] {
            assert_eq!(line.write_str(piece), Ok(()), "a piece that does not fit is dropped, not an error");
        }
        assert_eq!(line.as_str(), "ab€€");
        let mut line = Line::<4>::new();
        let _ = line.write_str("a€€");
        assert_eq!(line.as_str(), "a€", "the second € would need 7 bytes");
    }
}
