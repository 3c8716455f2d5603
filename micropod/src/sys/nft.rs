//! The one nf_tables expression `nftnl` cannot build: `masquerade to :MIN-MAX`.

use std::ptr::NonNull;

use nftnl::{
    Rule,
    expr::{Expression, Register},
    nftnl_sys as sys,
};

/// `NF_NAT_RANGE_PROTO_SPECIFIED` (linux/netfilter/nf_nat.h): the port registers count.
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 1 << 1;

/// `masq` with a port range taken from two registers (loaded by `immediate`s before it, in
/// network order as `nft` loads them).
pub(crate) struct MasqueradePorts {
    pub min: Register,
    pub max: Register,
}

impl Expression for MasqueradePorts {
    fn to_expr(&self, _rule: &Rule<'_>) -> NonNull<sys::nftnl_expr> {
        // SAFETY: `nftnl_expr_alloc` takes a NUL-terminated expression name and returns an
        // owned expression or NULL (checked); the setters take that expression, one of the
        // `masq` attribute numbers and a plain value.
        unsafe {
            let Some(expr) = NonNull::new(sys::nftnl_expr_alloc(c"masq".as_ptr())) else {
                // As nftnl itself does on a failed allocation.
                std::process::abort();
            };
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_MASQ_FLAGS as u16,
                NF_NAT_RANGE_PROTO_SPECIFIED,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_MASQ_REG_PROTO_MIN as u16,
                self.min.to_raw(),
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_MASQ_REG_PROTO_MAX as u16,
                self.max.to_raw(),
            );
            expr
        }
    }
}
