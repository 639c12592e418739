//! Serial-number arithmetic (RFC 1982) for 32-bit SEQ values.
//!
//! SEQ wraps after `2^32 - 1`; comparisons use the half-window rule so that a sequence that has
//! wrapped still compares as "newer".

/// `a` is newer than `b` (RFC 1982 `a > b`).
#[inline]
pub fn gt(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000_0000
}

/// `a` is newer than or equal to `b`.
#[inline]
pub fn ge(a: u32, b: u32) -> bool {
    a == b || gt(a, b)
}

/// `a` is older than or equal to `b`.
#[inline]
pub fn le(a: u32, b: u32) -> bool {
    !gt(a, b)
}

/// The newer of two serial numbers.
#[inline]
pub fn max(a: u32, b: u32) -> u32 {
    if gt(a, b) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_across_wrap() {
        assert!(gt(2, 1));
        assert!(!gt(1, 2));
        assert!(!gt(5, 5));
        assert!(gt(0, u32::MAX));
        assert!(gt(3, u32::MAX - 3));
        assert!(ge(7, 7));
        assert!(le(u32::MAX, 0));
        assert_eq!(max(u32::MAX, 1), 1);
        assert_eq!(max(10, 9), 10);
    }
}
