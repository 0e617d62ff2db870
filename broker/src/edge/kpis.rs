//! The `switchboard.v1.KpiService`: KPI views and their values (docs/KPIS.md).
//!
//! A definition is checked whole here before it is proposed (apply checks it again); values are
//! read from this node's store, which holds the same cells as every other node that applied the
//! same log. The newest window shown is the one holding this node's clock, so a quiet view still
//! shows the current (empty) window.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use switchboard_proto::v1 as pb;
use switchboard_proto::v1::kpi_service_server::KpiService as KpiRpc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{convert, Edge};
use crate::error::{BrokerError, Reason};
use crate::kpi::cell::{Cell, Group};
use crate::kpi::read::{read, ReadRequest, WindowReading};
use crate::kpi::view::parse_length;
use crate::kpi::{View, ViewDefinition, ViewRecord};
use crate::message::{now_us, Item, ItemOutcome, ViewWrite};
use crate::security::caller::Caller;

/// Largest definition text accepted.
const MAX_DEFINITION_BYTES: usize = 64 * 1024;

/// Values a watcher's stream holds before its task waits for the client.
const WATCH_BUFFER: usize = 2;

/// The `switchboard.v1.KpiService`; cheap to clone.
#[derive(Clone)]
pub(crate) struct KpisService {
    edge: Arc<Edge>,
}

/// What to read, checked.
#[derive(Debug, Clone)]
pub(crate) struct KpiQuery {
    /// The view's name.
    pub view: String,
    /// The window length as asked (empty: the view's first).
    pub window: String,
    /// Windows, 0 for 1.
    pub windows: u32,
    /// Only this group, when not empty.
    pub group: String,
}

impl KpisService {
    pub(super) fn new(edge: Arc<Edge>) -> KpisService {
        KpisService { edge }
    }

    /// Checks a definition and proposes it; the view as stored.
    ///
    /// # Errors
    /// `ADMIN_DENIED`, `VIEW_INVALID`, `VIEW_LIMIT`; nothing is written then.
    pub(crate) async fn define(
        &self,
        request: pb::DefineViewRequest,
        caller: &Caller,
    ) -> Result<pb::DefineViewResponse, BrokerError> {
        caller.check_admin("define a KPI view")?;
        let edge = &self.edge;
        if request.definition.len() > MAX_DEFINITION_BYTES {
            return Err(BrokerError::invalid(
                Reason::ViewInvalid,
                format!(
                    "the definition is {} bytes; at most {MAX_DEFINITION_BYTES}",
                    request.definition.len()
                ),
            ));
        }
        let view = ViewDefinition::parse(&request.definition)
            .map_err(|e| BrokerError::invalid(Reason::ViewInvalid, e.to_string()))?;
        let name = view.definition.name.clone();
        let limits = &edge.config.kpis;
        if edge.store.view(&name)?.is_none() {
            let count = edge.store.views().count();
            if count >= limits.max_views as usize {
                return Err(BrokerError::from(crate::message::Refusal::ViewLimit {
                    max_views: limits.max_views,
                }));
            }
        }
        let write = ViewWrite::Put {
            definition: view.definition.to_json(),
            defined_by: caller.owner(),
            backfill_limit: limits.backfill_limit,
            max_views: limits.max_views,
        };
        let (replaced, applied_at_us) = match edge.proposer.propose(Item::View(write)).await? {
            ItemOutcome::View {
                existed,
                applied_at_us,
                ..
            } => (existed, applied_at_us),
            ItemOutcome::Refused(refusal) => return Err(refusal.into()),
            other => {
                return Err(BrokerError::Consensus(format!(
                    "a view write was applied as {other:?}"
                )))
            }
        };
        self.applied_here(
            |record| record.is_some_and(|r| r.defined_at_us == applied_at_us),
            &name,
        )
        .await;
        let record = edge.store.view(&name)?.ok_or_else(|| not_found(&name))?;
        Ok(pb::DefineViewResponse {
            view: Some(view_message(&name, record)),
            replaced,
        })
    }

    /// Drops a view.
    ///
    /// # Errors
    /// `ADMIN_DENIED`, `VIEW_NOT_FOUND`.
    pub(crate) async fn delete(&self, name: &str, caller: &Caller) -> Result<(), BrokerError> {
        caller.check_admin("drop a KPI view")?;
        let write = ViewWrite::Delete {
            name: name.to_owned(),
        };
        match self.edge.proposer.propose(Item::View(write)).await? {
            ItemOutcome::View { existed: true, .. } => {
                self.applied_here(|record| record.is_none(), name).await;
                Ok(())
            }
            ItemOutcome::View { existed: false, .. } => Err(not_found(name)),
            other => Err(BrokerError::Consensus(format!(
                "a view write was applied as {other:?}"
            ))),
        }
    }

    /// Waits until this node's record of view `name` passes `holds`, so the caller's next read
    /// here sees the write ([`Edge::applied_here`]).
    async fn applied_here(&self, holds: impl Fn(Option<&ViewRecord>) -> bool, name: &str) {
        self.edge
            .applied_here(|| match self.edge.store.view(name) {
                Ok(record) => holds(record.as_ref()),
                Err(_) => false,
            })
            .await;
    }

    /// One view.
    ///
    /// # Errors
    /// `KPI_DENIED` (before looking, so a refused caller learns nothing of which views exist),
    /// `VIEW_NOT_FOUND`.
    pub(crate) fn get_view(&self, name: &str, caller: &Caller) -> Result<pb::View, BrokerError> {
        caller.check_read_kpi(name)?;
        let record = self.edge.store.view(name)?.ok_or_else(|| not_found(name))?;
        Ok(view_message(name, record))
    }

    /// Every view the caller may read, by name.
    ///
    /// # Errors
    /// The store's error.
    pub(crate) fn list(&self, caller: &Caller) -> Result<Vec<pb::View>, BrokerError> {
        let mut views = Vec::new();
        for entry in self.edge.store.views() {
            let (name, record) = entry?;
            if caller.may_read_kpi(&name) {
                views.push(view_message(&name, record));
            }
        }
        Ok(views)
    }

    /// A view's values now, with their ETag, for `caller`.
    ///
    /// # Errors
    /// `KPI_DENIED`, then what [`Self::values`] refuses.
    pub(crate) async fn read(
        &self,
        query: &KpiQuery,
        caller: &Caller,
    ) -> Result<pb::GetKpisResponse, BrokerError> {
        caller.check_read_kpi(&query.view)?;
        self.values(query).await
    }

    /// A view's values now, with their ETag; the caller's grant is checked before.
    ///
    /// # Errors
    /// `VIEW_NOT_FOUND`, `VIEW_INVALID` for a window the view does not have.
    async fn values(&self, query: &KpiQuery) -> Result<pb::GetKpisResponse, BrokerError> {
        let edge = Arc::clone(&self.edge);
        let query = query.clone();
        tokio::task::spawn_blocking(move || values_now(&edge, &query))
            .await
            .map_err(|e| BrokerError::Storage(format!("reading a KPI view failed: {e}")))?
    }

    /// Streams a view's values: now, then on each change, at most once per `min_interval`.
    ///
    /// # Errors
    /// `KPI_DENIED`, then what [`Self::values`] refuses, for the first reading.
    pub(crate) async fn watch(
        &self,
        query: KpiQuery,
        min_interval: Option<Duration>,
        caller: &Caller,
    ) -> Result<mpsc::Receiver<Result<pb::GetKpisResponse, BrokerError>>, BrokerError> {
        caller.check_read_kpi(&query.view)?;
        let floor = self.edge.config.kpis.watch_min_interval;
        let interval = min_interval.map_or(floor, |asked| asked.max(floor));
        let first = self.values(&query).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let service = self.clone();
        let mut progress = self.edge.progress.clone();
        let mut shutdown = self.edge.shutdown.clone();
        tokio::spawn(async move {
            let mut sent = first.etag.clone();
            // The window length the latest reading resolved (the view's first when none was
            // asked): the boundary a quiet view rolls over at.
            let mut length_s = resolved_length(&first);
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                // The throttle: at most one update per interval, however busy the view.
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = tx.closed() => return,
                    () = shutdown.wait() => return,
                }
                // Then wait for something that can change the values: an applied entry, or
                // the next window (rolling over on a quiet view).
                let until_next_window = until_next_window(length_s);
                tokio::select! {
                    changed = progress.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(until_next_window) => {}
                    () = tx.closed() => return,
                    () = shutdown.wait() => return,
                }
                let values = service.values(&query).await;
                if let Ok(values) = &values {
                    length_s = resolved_length(values);
                }
                match values {
                    Ok(values) if values.etag == sent => {}
                    Ok(values) => {
                        sent = values.etag.clone();
                        if tx.send(Ok(values)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // The view was dropped, say: the watcher is told why, and it ends.
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// The view `name` compiled, or why not.
fn view_named(edge: &Edge, name: &str) -> Result<(ViewRecord, View), BrokerError> {
    let record = edge.store.view(name)?.ok_or_else(|| not_found(name))?;
    let view = ViewDefinition::parse(&record.definition)
        .map_err(|e| BrokerError::Corrupt(format!("KPI view {name}: {e}")))?;
    Ok((record, view))
}

/// The window length a query names, in seconds (the view's first when none is named).
fn window_of(view: &View, asked: &str) -> Result<u32, BrokerError> {
    if asked.is_empty() {
        return Ok(view.windows[0].length_s);
    }
    let length_s = parse_length(asked)
        .map_err(|e| BrokerError::invalid(Reason::ViewInvalid, e.to_string()))?;
    if view.windows.iter().any(|w| w.length_s == length_s) {
        Ok(length_s)
    } else {
        Err(BrokerError::invalid(
            Reason::ViewInvalid,
            format!(
                "view {} has no {asked} window; it has {}",
                view.definition.name,
                lengths(view)
            ),
        ))
    }
}

fn lengths(view: &View) -> String {
    view.windows
        .iter()
        .map(|w| length_text(w.length_s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A length as a definition writes it: the largest unit that divides it.
fn length_text(length_s: u32) -> String {
    for (unit, seconds) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if length_s.is_multiple_of(seconds) {
            return format!("{}{unit}", length_s / seconds);
        }
    }
    format!("{length_s}s")
}

/// The time whose window is the newest shown, seconds: this node's clock. (A message stamped by
/// a leader whose clock is ahead lands in a window this node shows a moment later.)
fn now_s() -> u64 {
    now_us() / 1_000_000
}

/// The window length a reading was read at, seconds ([`length_text`] reads back).
fn resolved_length(values: &pb::GetKpisResponse) -> u32 {
    parse_length(&values.window).unwrap_or(60)
}

/// Time until the next window of `length_s` seconds starts.
fn until_next_window(length_s: u32) -> Duration {
    let now = now_us();
    let length_us = u64::from(length_s) * 1_000_000;
    Duration::from_micros(length_us - now % length_us)
}

fn values_now(edge: &Edge, query: &KpiQuery) -> Result<pb::GetKpisResponse, BrokerError> {
    let (record, view) = view_named(edge, &query.view)?;
    let length_s = window_of(&view, &query.window)?;
    let group = (!query.group.is_empty()).then_some(query.group.as_str());
    let readings = read(
        &edge.store,
        &view,
        ReadRequest {
            length_s,
            windows: query.windows.max(1),
            group,
            now_s: now_s(),
        },
    )?
    .unwrap_or_default();
    let mut etag = Etag::new();
    etag.add(query.view.as_bytes());
    etag.add(&record.defined_at_us.to_be_bytes());
    etag.add(&length_s.to_be_bytes());
    etag.add(query.group.as_bytes());
    for window in &readings {
        etag.add(&window.start_s.to_be_bytes());
        for (group, cell) in &window.groups {
            let mut key = Vec::new();
            group.to_key(&mut key);
            etag.add(&key);
            etag.add(
                &cell
                    .encode()
                    .map_err(|e| BrokerError::Corrupt(e.to_string()))?,
            );
        }
    }
    Ok(pb::GetKpisResponse {
        not_modified: false,
        etag: etag.finish(),
        view: query.view.clone(),
        window: length_text(length_s),
        windows: readings
            .into_iter()
            .map(|w| window_message(&view, length_s, w))
            .collect(),
    })
}

/// FNV-1a, 64 bits: the same on every node and every build, unlike std's hasher.
struct Etag(u64);

impl Etag {
    fn new() -> Etag {
        Etag(0xcbf2_9ce4_8422_2325)
    }

    fn add(&mut self, bytes: &[u8]) {
        // A length first, so that ("ab", "c") and ("a", "bc") differ.
        for byte in (bytes.len() as u64).to_be_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> String {
        format!("{:016x}", self.0)
    }
}

fn window_message(view: &View, length_s: u32, window: WindowReading) -> pb::KpiWindow {
    pb::KpiWindow {
        start: Some(convert::timestamp(window.start_s * 1_000_000)),
        end: Some(convert::timestamp(
            (window.start_s + u64::from(length_s)) * 1_000_000,
        )),
        groups: window
            .groups
            .into_iter()
            .map(|(group, cell)| group_message(view, group, cell))
            .collect(),
    }
}

fn group_message(view: &View, group: Group, cell: Cell) -> pb::KpiGroup {
    let (kind, name) = match group {
        Group::Missing => (pb::KpiGroupKind::Missing, String::new()),
        Group::Other => (pb::KpiGroupKind::Other, String::new()),
        Group::Named(name) => (pb::KpiGroupKind::Named, name),
    };
    let measures = view
        .definition
        .measures
        .iter()
        .zip(
            cell.measures
                .iter()
                .chain(std::iter::repeat(&Default::default())),
        )
        .map(|(measure, stats)| {
            let has = stats.count > 0;
            pb::KpiMeasure {
                name: measure.name.clone(),
                count: stats.count,
                sum: stats.sum,
                avg: stats.avg(),
                min: has.then_some(stats.min),
                max: has.then_some(stats.max),
                p50: stats.quantile(0.5),
                p90: stats.quantile(0.9),
                p95: stats.quantile(0.95),
                p99: stats.quantile(0.99),
            }
        })
        .collect();
    pb::KpiGroup {
        kind: kind as i32,
        name,
        messages: cell.messages,
        measures,
    }
}

fn view_message(name: &str, record: ViewRecord) -> pb::View {
    let backfill = record.backfill;
    pb::View {
        name: name.to_owned(),
        definition: record.definition,
        defined_at: Some(convert::timestamp(record.defined_at_us)),
        defined_by: convert::owner_text(record.defined_by.as_ref()),
        backfill: Some(pb::Backfill {
            messages_read: backfill.messages_read,
            messages_counted: backfill.messages_counted,
            first_offset: backfill.first_offset,
            last_offset: backfill.last_offset,
            truncated: backfill.truncated,
        }),
    }
}

fn not_found(name: &str) -> BrokerError {
    BrokerError::NotFound {
        reason: Reason::ViewNotFound,
        message: format!("no KPI view is named {:?}", crate::error::shorten(name)),
    }
}

fn query_of(view: String, window: String, windows: u32, group: String) -> KpiQuery {
    KpiQuery {
        view,
        window,
        windows,
        group,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchKpisResponse, Status>> + Send>>;

#[tonic::async_trait]
impl KpiRpc for KpisService {
    async fn define_view(
        &self,
        request: Request<pb::DefineViewRequest>,
    ) -> Result<Response<pb::DefineViewResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        Ok(Response::new(
            self.define(request.into_inner(), &caller).await?,
        ))
    }

    async fn get_view(
        &self,
        request: Request<pb::GetViewRequest>,
    ) -> Result<Response<pb::GetViewResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        let view = KpisService::get_view(self, &request.into_inner().name, &caller)?;
        Ok(Response::new(pb::GetViewResponse { view: Some(view) }))
    }

    async fn list_views(
        &self,
        request: Request<pb::ListViewsRequest>,
    ) -> Result<Response<pb::ListViewsResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        Ok(Response::new(pb::ListViewsResponse {
            views: self.list(&caller)?,
        }))
    }

    async fn delete_view(
        &self,
        request: Request<pb::DeleteViewRequest>,
    ) -> Result<Response<pb::DeleteViewResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        self.delete(&request.into_inner().name, &caller).await?;
        Ok(Response::new(pb::DeleteViewResponse {}))
    }

    async fn get_kpis(
        &self,
        request: Request<pb::GetKpisRequest>,
    ) -> Result<Response<pb::GetKpisResponse>, Status> {
        let caller = Caller::of(request.extensions())?;
        let request = request.into_inner();
        let if_none_match = request.if_none_match;
        let query = query_of(request.view, request.window, request.windows, request.group);
        let values = self.read(&query, &caller).await?;
        if !if_none_match.is_empty() && if_none_match == values.etag {
            return Ok(Response::new(pb::GetKpisResponse {
                not_modified: true,
                etag: values.etag,
                ..Default::default()
            }));
        }
        Ok(Response::new(values))
    }

    type WatchKpisStream = WatchStream;

    async fn watch_kpis(
        &self,
        request: Request<pb::WatchKpisRequest>,
    ) -> Result<Response<Self::WatchKpisStream>, Status> {
        let caller = Caller::of(request.extensions())?;
        let request = request.into_inner();
        let min_interval = request
            .min_interval
            .and_then(|d| Duration::try_from(d).ok());
        let query = query_of(request.view, request.window, request.windows, request.group);
        let rx = self.watch(query, min_interval, &caller).await?;
        let stream = futures::StreamExt::map(ReceiverStream::new(rx), |item| {
            item.map(|values| pb::WatchKpisResponse {
                values: Some(values),
            })
            .map_err(Status::from)
        });
        // Like every stream, a watch ends (TOKEN_EXPIRED) when its caller's token does.
        let bounded = super::auth::TokenBound::new(&caller, Box::pin(stream));
        Ok(Response::new(Box::pin(bounded)))
    }
}
