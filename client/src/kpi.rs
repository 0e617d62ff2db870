//! KPI views and their values (the `switchboard.v1.KpiService`; docs/KPIS.md): define, read,
//! list and drop views, read their values with an ETag, and watch them change.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use switchboard_proto::v1::{
    DefineViewRequest, DefineViewResponse, DeleteViewRequest, GetKpisRequest, GetKpisResponse,
    GetViewRequest, ListViewsRequest, View, WatchKpisRequest, WatchKpisResponse,
};
use tonic::codec::Streaming;

use crate::{Client, Error};

/// Which values of a view to read: [`KpiQuery::new`] with the view's name, then the options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KpiQuery {
    /// The view's name.
    pub view: String,
    /// The window length as the view names it (`1m`, `1h`, ...); empty: the view's first.
    pub window: String,
    /// How many windows, ending with the current one; 0: 1.
    pub windows: u32,
    /// Only this group (by name); empty: every group.
    pub group: String,
    /// The ETag of values already held: when still current, the answer is `not_modified`
    /// (ignored by [`Client::kpi_watch`]).
    pub if_none_match: String,
}

impl KpiQuery {
    /// The view's first window length, the current window, every group.
    pub fn new(view: impl Into<String>) -> KpiQuery {
        KpiQuery {
            view: view.into(),
            ..KpiQuery::default()
        }
    }

    /// The window length (`1m`, `5m`, `1d`, ... as the view names it).
    pub fn window(mut self, window: impl Into<String>) -> KpiQuery {
        self.window = window.into();
        self
    }

    /// How many windows, ending with the current one.
    pub fn windows(mut self, windows: u32) -> KpiQuery {
        self.windows = windows;
        self
    }

    /// Only this group.
    pub fn group(mut self, group: impl Into<String>) -> KpiQuery {
        self.group = group.into();
        self
    }

    /// The ETag of the values held.
    pub fn if_none_match(mut self, etag: impl Into<String>) -> KpiQuery {
        self.if_none_match = etag.into();
        self
    }
}

impl Client {
    /// Defines a view from its definition (TOML, or JSON starting with `{`), replacing one of the
    /// same name, and backfills it; the answer is the view as stored, with its backfill report.
    ///
    /// # Errors
    /// `VIEW_INVALID` (the message names the field), `VIEW_LIMIT`, `ADMIN_DENIED`, or the call's.
    pub async fn kpi_define(
        &self,
        definition: impl Into<String>,
    ) -> Result<DefineViewResponse, Error> {
        let request = DefineViewRequest {
            definition: definition.into(),
        };
        Ok(self.kpis_grpc().define_view(request).await?.into_inner())
    }

    /// One view's definition.
    ///
    /// # Errors
    /// `VIEW_NOT_FOUND`, or the call's.
    pub async fn kpi_get_view(&self, name: &str) -> Result<View, Error> {
        let request = GetViewRequest {
            name: name.to_owned(),
        };
        let answer = self.kpis_grpc().get_view(request).await?.into_inner();
        // A broker always answers with the view; an empty one stands in for a broken answer.
        Ok(answer.view.unwrap_or_default())
    }

    /// Every view, by name.
    ///
    /// # Errors
    /// The call's.
    pub async fn kpi_list(&self) -> Result<Vec<View>, Error> {
        Ok(self
            .kpis_grpc()
            .list_views(ListViewsRequest {})
            .await?
            .into_inner()
            .views)
    }

    /// Drops a view and its values.
    ///
    /// # Errors
    /// `VIEW_NOT_FOUND`, `ADMIN_DENIED`, or the call's.
    pub async fn kpi_delete(&self, name: &str) -> Result<(), Error> {
        let request = DeleteViewRequest {
            name: name.to_owned(),
        };
        self.kpis_grpc().delete_view(request).await?;
        Ok(())
    }

    /// A view's values now, with their ETag (or `not_modified` when `if_none_match` is current).
    ///
    /// # Errors
    /// `VIEW_NOT_FOUND`, `VIEW_INVALID` for a window length the view does not have, or the
    /// call's.
    pub async fn kpi_values(&self, query: KpiQuery) -> Result<GetKpisResponse, Error> {
        let request = GetKpisRequest {
            view: query.view,
            window: query.window,
            windows: query.windows,
            group: query.group,
            if_none_match: query.if_none_match,
        };
        Ok(self.kpis_grpc().get_kpis(request).await?.into_inner())
    }

    /// Watches a view's values: the current ones first, then each time they change, at most once
    /// per `min_interval` (`None`: the broker's `kpis.watch_min_interval`, which is also the
    /// floor).
    ///
    /// # Errors
    /// What [`Client::kpi_values`] refuses, or the call's; later errors come through the stream.
    pub async fn kpi_watch(
        &self,
        query: KpiQuery,
        min_interval: Option<Duration>,
    ) -> Result<KpiWatch, Error> {
        let request = WatchKpisRequest {
            view: query.view,
            window: query.window,
            windows: query.windows,
            group: query.group,
            min_interval: min_interval.and_then(|d| prost_types::Duration::try_from(d).ok()),
        };
        let updates = self.kpis_grpc().watch_kpis(request).await?.into_inner();
        Ok(KpiWatch {
            updates: Box::new(updates),
            done: false,
        })
    }
}

/// The values of a view as they change, from [`Client::kpi_watch`]. It does not resume: when the
/// call fails or the broker ends it (a dropped view ends it with `VIEW_NOT_FOUND`), it yields that
/// error (a closed stream is `UNAVAILABLE`) and ends. Dropping it cancels the call.
#[derive(Debug)]
pub struct KpiWatch {
    updates: Box<Streaming<WatchKpisResponse>>,
    done: bool,
}

impl Stream for KpiWatch {
    type Item = Result<GetKpisResponse, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match ready!(self.updates.poll_next_unpin(cx)) {
                Some(Ok(update)) => match update.values {
                    Some(values) => return Poll::Ready(Some(Ok(values))),
                    // An update without values is not one the broker sends; skipped.
                    None => continue,
                },
                Some(Err(status)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::from(status))));
                }
                None => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::Status {
                        code: tonic::Code::Unavailable,
                        reason: None,
                        message: "the broker closed the KPI watch".to_owned(),
                        metadata: Default::default(),
                    })));
                }
            }
        }
    }
}
