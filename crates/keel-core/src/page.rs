//! Cursor pagination. A cursor is opaque to clients: base64 of the last
//! item's sort key. Every list endpoint takes `?limit=&cursor=` and answers
//! `{ "items": [...], "next_cursor": "..." | null }`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 200;

/// Query parameters of every list endpoint.
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// How many items to return (1–200, default 50).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PageError {
    #[error("limit must be between 1 and {MAX_LIMIT}")]
    Limit,
    #[error("cursor is not one this API returned")]
    Cursor,
}

/// Validated page parameters: the limit and, after the first page, the id
/// the next page starts after (lists are ordered by v7 id, i.e. creation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    pub limit: u32,
    pub after: Option<Uuid>,
}

impl PageParams {
    pub fn validate(&self) -> Result<Page, PageError> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(PageError::Limit);
        }
        let after = match &self.cursor {
            None => None,
            Some(cursor) => {
                let bytes = URL_SAFE_NO_PAD
                    .decode(cursor)
                    .map_err(|_| PageError::Cursor)?;
                Some(Uuid::from_slice(&bytes).map_err(|_| PageError::Cursor)?)
            }
        };
        Ok(Page { limit, after })
    }
}

impl Page {
    /// SQL `LIMIT` to use: one more than asked, to know whether a next page exists.
    pub fn fetch_limit(&self) -> i64 {
        i64::from(self.limit) + 1
    }
}

/// One page of a list.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Paginated<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl<T> Paginated<T> {
    /// Builds a page from rows fetched with [`Page::fetch_limit`]; `key`
    /// gives each row's id, the sort key.
    pub fn from_rows(mut rows: Vec<T>, page: Page, key: impl Fn(&T) -> Uuid) -> Self {
        let next_cursor = if rows.len() > page.limit as usize {
            rows.truncate(page.limit as usize);
            rows.last()
                .map(|last| URL_SAFE_NO_PAD.encode(key(last).as_bytes()))
        } else {
            None
        };
        Self {
            items: rows,
            next_cursor,
        }
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Paginated<U> {
        Paginated {
            items: self.items.into_iter().map(f).collect(),
            next_cursor: self.next_cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_through_the_next_page() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let page = PageParams {
            limit: Some(2),
            cursor: None,
        }
        .validate()
        .unwrap();
        let first = Paginated::from_rows(ids.clone(), page, |id| *id);
        assert_eq!(first.items, ids[..2]);
        let next = PageParams {
            limit: Some(2),
            cursor: first.next_cursor,
        }
        .validate()
        .unwrap();
        assert_eq!(next.after, Some(ids[1]));
    }

    #[test]
    fn the_last_page_has_no_cursor() {
        let page = PageParams::default().validate().unwrap();
        let only = Paginated::from_rows(vec![Uuid::now_v7()], page, |id| *id);
        assert!(only.next_cursor.is_none());
    }

    #[test]
    fn bad_limits_and_cursors_are_rejected() {
        assert_eq!(
            PageParams {
                limit: Some(0),
                cursor: None
            }
            .validate(),
            Err(PageError::Limit)
        );
        assert_eq!(
            PageParams {
                limit: Some(201),
                cursor: None
            }
            .validate(),
            Err(PageError::Limit)
        );
        let garbage = PageParams {
            limit: None,
            cursor: Some("!!".into()),
        };
        assert_eq!(garbage.validate(), Err(PageError::Cursor));
    }
}
