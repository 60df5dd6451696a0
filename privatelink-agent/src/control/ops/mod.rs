//! Operations: each validates the whole request against the current state and returns the changes
//! to commit and the response. Nothing is written here, so a refused request changes nothing.
pub mod accounts;
pub mod endpoints;
pub mod groups;
pub mod services;
#[cfg(test)]
mod tests;

use super::{
    error::{ApiError, ApiResult},
    state::State,
    types::Change,
};

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Account(String),
}

/// What an operation may use besides the state: the caller, the clock, randomness for ids, and the
/// cluster settings that go into names.
pub struct Ctx<'a> {
    pub caller: &'a Caller,
    pub now: u64,
    pub random: &'a mut dyn FnMut() -> u32,
    pub cluster: &'a super::types::Cluster,
    /// The link ids and subnet addresses the state's endpoints hold.
    pub alloc: &'a super::alloc::Allocations,
}

/// Changes to commit and the response to return once they are committed.
pub type Outcome<T> = ApiResult<(Vec<Change>, T)>;

/// The calling account; the admin token is for accounts and networks only.
pub fn account(caller: &Caller) -> ApiResult<&str> {
    match caller {
        Caller::Account(a) => Ok(a),
        Caller::Admin => Err(ApiError::forbidden(
            "account_required",
            "this operation is done with an account's token, not the admin token",
        )),
    }
}

pub fn admin(caller: &Caller) -> ApiResult<()> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Account(_) => Err(ApiError::forbidden(
            "admin_required",
            "this operation needs the admin token",
        )),
    }
}

impl Ctx<'_> {
    pub fn account(&self) -> ApiResult<&str> {
        account(self.caller)
    }

    pub fn admin(&self) -> ApiResult<()> {
        admin(self.caller)
    }

    /// A fresh id `<prefix>-` + 8 lowercase hex digits not yet taken.
    pub fn new_id(&mut self, prefix: &str, taken: impl Fn(&str) -> bool) -> String {
        loop {
            let id = format!("{prefix}-{:08x}", (self.random)());
            if !taken(&id) {
                return id;
            }
        }
    }
}

/// The lowest number ≥ 1 not in `used`, below `limit`.
pub fn lowest_free(used: impl Iterator<Item = u32>, limit: u32, what: &str) -> ApiResult<u32> {
    let mut used: Vec<u128> = used.map(u128::from).collect();
    used.sort_unstable();
    used.dedup();
    super::alloc::first_free_in(&used, 1, u128::from(limit).saturating_sub(1))
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| capacity(limit, what))
}

/// The error of a number space (below `limit`) with every number in use.
pub fn capacity(limit: u32, what: &str) -> ApiError {
    ApiError::conflict(
        "capacity",
        format!("all {} {what} numbers are in use", limit - 1),
    )
}

/// Whether `caller` may see objects owned by `owner`.
pub fn owns(caller: &Caller, owner: &str) -> bool {
    matches!(caller, Caller::Account(a) if a == owner)
}

impl State {
    /// True when the account exists.
    pub fn has_account(&self, id: &str) -> bool {
        self.accounts.contains_key(id)
    }
}
