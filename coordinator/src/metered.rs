//! Measuring by wrapping: an RPC capability counted call by call, an
//! ingress request counted by routed app and status. Both report through
//! [`crate::observe::Observe`], so audited RPC calls also get their line.

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::methods;

/// A capability client that counts (and for audited calls, records) every
/// call made on it from the network.
struct MeteredHook {
    inner: Box<dyn capnp::private::capability::ClientHook>,
    interface: &'static str,
    observe: Arc<crate::observe::Observe>,
    /// Who holds the capability (audited interfaces only).
    actor: Option<crate::audit::Actor>,
    /// The app an `App` capability is confined to.
    app: Option<String>,
}

impl capnp::private::capability::ClientHook for MeteredHook {
    fn add_ref(&self) -> Box<dyn capnp::private::capability::ClientHook> {
        Box::new(MeteredHook {
            inner: self.inner.add_ref(),
            interface: self.interface,
            observe: self.observe.clone(),
            actor: self.actor.clone(),
            app: self.app.clone(),
        })
    }

    fn new_call(
        &self,
        interface_id: u64,
        method_id: u16,
        size_hint: Option<capnp::MessageSize>,
    ) -> capnp::capability::Request<capnp::any_pointer::Owned, capnp::any_pointer::Owned> {
        self.inner.new_call(interface_id, method_id, size_hint)
    }

    fn call(
        &self,
        interface_id: u64,
        method_id: u16,
        params: Box<dyn capnp::private::capability::ParamsHook>,
        results: Box<dyn capnp::private::capability::ResultsHook>,
    ) -> capnp::capability::Promise<(), capnp::Error> {
        let promise = self.inner.call(interface_id, method_id, params, results);
        let method = methods::name(self.interface, method_id);
        let interface = self.interface;
        let observe = self.observe.clone();
        let actor = self.actor.clone();
        let app = self.app.clone();
        capnp::capability::Promise::from_future(async move {
            let r = promise.await;
            observe.rpc(interface, method, r.is_ok(), actor, app);
            r
        })
    }

    fn get_brand(&self) -> usize {
        self.inner.get_brand()
    }

    fn get_ptr(&self) -> usize {
        self.inner.get_ptr()
    }

    fn get_resolved(&self) -> Option<Box<dyn capnp::private::capability::ClientHook>> {
        self.inner.get_resolved()
    }

    fn when_more_resolved(
        &self,
    ) -> Option<
        capnp::capability::Promise<Box<dyn capnp::private::capability::ClientHook>, capnp::Error>,
    > {
        self.inner.when_more_resolved()
    }

    fn when_resolved(&self) -> capnp::capability::Promise<(), capnp::Error> {
        self.inner.when_resolved()
    }
}

/// `client`, counting every call by method (and recording audited ones
/// with `actor`); unchanged when observation is off.
pub fn metered<C: capnp::capability::FromClientHook>(
    client: C,
    interface: &'static str,
    observe: &Arc<crate::observe::Observe>,
    actor: Option<crate::audit::Actor>,
    app: Option<String>,
) -> C {
    if !observe.enabled() {
        return client;
    }
    C::new(Box::new(MeteredHook {
        inner: client.into_client_hook(),
        interface,
        observe: observe.clone(),
        actor,
        app,
    }))
}

tokio::task_local! {
    /// The app the ingress routed the current request to.
    static ROUTED_APP: std::cell::RefCell<Option<String>>;
}

/// Called by the ingress once the route is known.
pub fn note_ingress_app(app: &str) {
    let _ = ROUTED_APP.try_with(|a| *a.borrow_mut() = Some(app.to_string()));
}

/// Runs one ingress request, counting it by routed app and status class.
pub async fn observe_ingress<B>(
    observe: Arc<crate::observe::Observe>,
    request: impl std::future::Future<Output = Result<hyper::Response<B>, std::convert::Infallible>>,
) -> Result<hyper::Response<B>, std::convert::Infallible> {
    if !observe.enabled() {
        return request.await;
    }
    let started = Instant::now();
    ROUTED_APP
        .scope(std::cell::RefCell::new(None), async move {
            let r = request.await;
            let app = ROUTED_APP
                .with(|a| a.borrow_mut().take())
                .unwrap_or_else(|| "-".to_string());
            if let Ok(resp) = &r {
                observe.ingress(app, resp.status().as_u16(), started.elapsed());
            }
            r
        })
        .await
}
