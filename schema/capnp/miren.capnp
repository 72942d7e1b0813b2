@0xd1933b7a4198bd4d;
# The wire contract between the `miren` CLI, runners and the coordinator.
#
# Every QUIC connection carries one bi-stream with a Cap'n Proto two-party
# RPC session. The coordinator's bootstrap capability is a `Cluster`; what it
# will hand out beyond `info` depends on the TLS identity of the peer, so an
# anonymous peer holds no reference through which it could reach admin methods.

struct ClusterInfo {
  name @0 :Text;
  version @1 :Text;
  issuerUrl @2 :Text;
  clusterId @3 :Text;
  coordinators @4 :List(Text);
  # host:port of every running coordinator, the answering one first.
}

struct CoordinatorInfo {
  id @0 :Text;
  name @1 :Text;
  address @2 :Text;
  version @3 :Text;
  startedUnix @4 :Int64;
  leader @5 :Bool;
  # It runs the reconcile loop and key rotation.
}

enum Role {
  anonymous @0;
  admin @1;
  runner @2;
}

struct ClusterStatus {
  info @0 :ClusterInfo;
  uptimeSecs @1 :UInt64;
  runners @2 :UInt32;
  apps @3 :UInt32;
  sandboxes @4 :UInt32;
  joinTokens @5 :UInt32;
  ciBindings @6 :UInt32;
  signingKeys @7 :UInt32;
  coordinators @8 :List(CoordinatorInfo);
  # The running coordinators, the answering one first.
}

enum KeyState {
  # What a signing key is doing at a given moment.
  pending @0;
  active @1;
  retired @2;
  expired @3;
  legacy @4;
}

struct SigningKey {
  kid @0 :Text;
  alg @1 :Text;
  state @2 :KeyState;
  createdUnix @3 :Int64;
  activatesUnix @4 :Int64;
  retiresUnix @5 :Int64;
}

interface Cluster {
  # Bootstrap capability of every connection.
  info @0 () -> (info :ClusterInfo);
  whoami @1 () -> (role :Role, subject :Text);
  ping @2 (payload :Data) -> (payload :Data);
  admin @3 () -> (admin :Admin);
  # Fails unless the peer presented the cluster's admin certificate.
  join @4 (request :JoinRequest) -> (result :JoinResult);
  # Open to anonymous peers: redeems a join token for a runner certificate.
  runner @5 (agent :RunnerAgent) -> (session :RunnerSession);
  # Fails unless the peer presented a certificate of a registered runner.
  ciLogin @6 (token :Text, app :Text) -> (app :App);
  # Open to anyone: a CI pipeline's OIDC token that matches one of the app's
  # bindings buys that app's capability and nothing else. It is a token
  # exchange at the token endpoint followed by `login`; the token is spent.
  login @7 (accessToken :Text, app :Text) -> (app :App);
  # Open to anyone: an access token from the token endpoint
  # (`<issuer>/oauth2/token`, typ at+jwt) whose scope names `app` buys that
  # app's capability, confined to the scope's actions.
  joinCoordinator @8 (codeId :Text, secret :Data) -> (clusterKey :Data, clusterId :Text);
  # Open to anonymous peers (over a connection pinned to the cluster CA by
  # the code): spends a coordinator code and answers the cluster key that
  # opens the cluster's sealed records in the shared store.
  # `agent` is how the coordinator asks the runner to start and stop sandboxes.
}

struct Label {
  key @0 :Text;
  value @1 :Text;
}

struct JoinRequest {
  tokenId @0 :Text;
  secret @1 :Data;
  csrDer @2 :Data;
  # PKCS#10 request made with the runner's own key; its subject is ignored.
  name @3 :Text;
  labels @4 :List(Label);
  version @5 :Text;
}

struct JoinResult {
  runnerId @0 :Text;
  certPem @1 :Text;
  caPem @2 :Text;
}

enum Isolation {
  # How a runner isolates its sandboxes.
  unknown @0;
  # Not reported (a runner not seen since the coordinator started).
  none @1;
  # Plain processes.
  bwrap @2;
  # bubblewrap namespaces.
}

struct RunnerStatus {
  version @0 :Text;
  sandboxes @1 :UInt32;
  isolation @2 :Isolation;
  limits @3 :Text;
  # How sandbox resources are limited ("cgroup v1 (memory, pids, cpu)"),
  # empty when they are not (said loudly by the runner and `runner list`).
  running @4 :List(Text);
  # Every sandbox on the runner (starting ones included): the coordinator
  # starts what is assigned and missing, and stops what is not assigned.
}

interface RunnerSession {
  heartbeat @0 (status :RunnerStatus) -> (cordoned :Bool);
  renew @1 (csrDer :Data) -> (certPem :Text);
  # A fresh certificate for a new key of the same runner.
  fetchArtifact @2 (sha256 :Text, offset :UInt64, length :UInt32) -> (data :Data, size :UInt64);
  issueWorkloadToken @3 (sandboxId :Text, audiences :List(Text), ttlSecs :UInt32) -> (token :Text);
  # The coordinator derives app and org from its own records and refuses a
  # sandbox this runner does not host.
  reportSandbox @4 (report :SandboxReport) -> ();
  issueWorkloadTokens @5 (requests :List(TokenRequest)) -> (results :List(TokenResult));
  # Several tokens in one call: the runner sends together the misses that
  # queued while its earlier calls were out. Each is decided (as by
  # issueWorkloadToken) and refused on its own; results in request order.
  # At most 64 requests per call.
}

struct TokenRequest {
  sandboxId @0 :Text;
  audiences @1 :List(Text);
  ttlSecs @2 :UInt32;
}

struct TokenResult {
  union {
    token @0 :Text;
    refused @1 :Text;
    # Why this one was not minted, in the coordinator's words.
  }
}

struct ServiceSpec {
  name @0 :Text;
  command @1 :Text;
  port @2 :UInt16;
  instances @3 :UInt32;
  env @4 :List(Label);
  limits @5 :ResourceLimits;
}

struct ResourceLimits {
  # What a sandbox may use; 0 = the runner's default.
  memoryBytes @0 :UInt64;
  cpuMillis @1 :UInt32;
  # Thousandths of a CPU.
  pids @2 :UInt32;
}

struct SandboxSpec {
  id @0 :Text;
  app @1 :Text;
  version @2 :Text;
  service @3 :Text;
  command @4 :Text;
  port @5 :UInt16;
  env @6 :List(Label);
  artifactSha256 @7 :Text;
  issuerUrl @8 :Text;
  limits @9 :ResourceLimits;
}

enum SandboxState {
  # What a runner reports of one of its sandboxes.
  starting @0;
  healthy @1;
  crashed @2;
  failed @3;
  stopped @4;
}

struct SandboxReport {
  id @0 :Text;
  state @1 :SandboxState;
  restarts @2 :UInt32;
  address @3 :Text;
  lastLog @4 :Text;
  lastExit @5 :Text;
  # Why the last run ended ("exit status: 1", "out of memory (limit
  # 256MiB)"); kept after a restart, empty before any exit.
}

interface RunnerAgent {
  startSandbox @0 (spec :SandboxSpec) -> ();
  stopSandbox @1 (id :Text) -> ();
  logs @2 (id :Text, lines :UInt32) -> (lines :List(Text));
  ping @3 () -> ();
  # Answered at once: the coordinator asks a registered session before a
  # new connection with the same identity takes its place, so that a
  # runner restarted after a crash is not refused as a duplicate of its
  # dead self, and a live one is not replaced by a copy of its identity.
}

interface ArtifactUpload {
  write @0 (data :Data) -> ();
  finish @1 (sha256 :Text) -> (size :UInt64);
}

struct JoinTokenInfo {
  id @0 :Text;
  name @1 :Text;
  reusable @2 :Bool;
  uses @3 :UInt32;
  createdUnix @4 :Int64;
  expiresUnix @5 :Int64;
  state @6 :JoinTokenState;
  labels @7 :List(Label);
}

enum DeployKeyState {
  active @0;
  expired @1;
  revoked @2;
}

struct DeployKeyInfo {
  # A deploy key as listings show it: never its secret.
  id @0 :Text;
  # Also its OAuth client_id.
  app @1 :Text;
  description @2 :Text;
  createdUnix @3 :Int64;
  expiresUnix @4 :Int64;
  lastUsedUnix @5 :Int64;
  # 0: never used.
  revokedUnix @6 :Int64;
  # 0: not revoked.
  overlapUntilUnix @7 :Int64;
  # 0: no old secret still works.
  state @8 :DeployKeyState;
}

enum JoinTokenState {
  valid @0;
  used @1;
  revoked @2;
  expired @3;
}

enum RunnerState {
  down @0;
  # Not connected (or never since the coordinator started).
  ready @1;
}

struct RunnerInfo {
  id @0 :Text;
  name @1 :Text;
  status @2 :RunnerState;
  labels @3 :List(Label);
  sandboxes @4 :UInt32;
  lastSeenUnix @5 :Int64;
  version @6 :Text;
  cordoned @7 :Bool;
  isolation @8 :Isolation;
  certExpiresUnix @9 :Int64;
  limits @10 :Text;
}

struct CiCondition {
  # A claim that must match one of the patterns (globs; OR).
  claim @0 :Text;
  patterns @1 :List(Text);
}

struct CiIdPin {
  # An immutable id the token's claim must equal.
  claim @0 :Text;
  value @1 :Text;
  learned @2 :Bool;
  # Learned from the first token that matched (else given by the operator).
  learnedUnix @3 :Int64;
}

struct CiBinding {
  # identity::bindings::Binding. In addCiBinding the coordinator assigns
  # id and createdUnix and re-validates every rule.
  id @0 :Text;
  app @1 :Text;
  provider @2 :Text;
  issuer @3 :Text;
  subject @4 :Text;
  conditions @5 :List(CiCondition);
  ids @6 :List(CiIdPin);
  allowBroad @7 :Bool;
  description @8 :Text;
  createdUnix @9 :Int64;
}

enum CiCheckOutcome {
  matched @0;
  mismatched @1;
  missing @2;
  willPin @3;
}

struct CiCheck {
  claim @0 :Text;
  expected @1 :List(Text);
  hasValue @2 :Bool;
  tokenValue @3 :Text;
  outcome @4 :CiCheckOutcome;
}

enum CiVerdict {
  accepts @0;
  noMatch @1;
  drift @2;
}

struct CiBindingExplanation {
  binding @0 :CiBinding;
  checks @1 :List(CiCheck);
  verdict @2 :CiVerdict;
  drift @3 :Text;
  # The drift refusal's words when verdict is drift.
}

struct CiBindingTest {
  tokenValid @0 :Bool;
  tokenProblem @1 :Text;
  # Why the token would be refused before any binding is matched
  # (signature, issuer, audience, expiry); "" when tokenValid.
  bindings @2 :List(CiBindingExplanation);
}

interface Admin {
  status @0 () -> (status :ClusterStatus);
  mintWorkloadToken @1 (app :Text, sandboxId :Text, organization :Text,
                        audiences :List(Text), ttlSecs :UInt32) -> (token :Text);
  listSigningKeys @2 () -> (keys :List(SigningKey));
  rotateSigningKey @3 () -> (keys :List(SigningKey));
  verifyWorkloadToken @4 (token :Text, audience :Text) -> (claims :WorkloadClaims);
  # Verifies a token of this cluster (current or recent issuer) the way an
  # outside verifier would; fails with the reason.
  createJoinToken @5 (ttlSecs :UInt64, reusable :Bool, name :Text, labels :List(Label))
      -> (token :Text, info :JoinTokenInfo);
  listJoinTokens @6 () -> (tokens :List(JoinTokenInfo));
  revokeJoinToken @7 (id :Text) -> ();
  listRunners @8 () -> (runners :List(RunnerInfo));
  removeRunner @9 (id :Text) -> ();
  setRunnerCordon @10 (id :Text, cordoned :Bool) -> ();
  app @11 (name :Text) -> (app :App);
  # The same app capability a CI token buys, for any app.
  listApps @12 () -> (apps :List(AppStatus));
  deleteApp @13 (app :Text) -> ();
  setRoute @14 (host :Text, app :Text) -> ();
  # host "" is the default route.
  listRoutes @15 () -> (routes :List(Route));
  removeRoute @16 (host :Text) -> ();
  addCiBinding @17 (binding :CiBinding) -> (id :Text);
  # The coordinator assigns the id and re-validates every rule, breadth
  # included (refused unless allowBroad).
  listCiBindings @18 (app :Text) -> (bindings :List(CiBinding));
  removeCiBinding @19 (id :Text) -> ();
  routeOidcEnable @20 (host :Text, config :RouteOidcConfig) -> ();
  # Labs (routeoidc). host "" is the default route.
  routeOidcShow @21 (host :Text) -> (route :RouteOidcShown);
  routeOidcDisable @22 (host :Text) -> ();
  listOidcProviders @23 () -> (providers :List(OidcProvider));
  removeOidcProvider @24 (name :Text) -> ();
  renewAdmin @25 (csrDer :Data, validitySecs :UInt64) -> (certPem :Text);
  # A new admin certificate with the caller's own name for the key that
  # signed the PKCS#10 request (its subject is ignored; the key never leaves
  # the caller). validitySecs 0 = ten years; never past the CA's end. The
  # caller's current certificate keeps working until it expires.
  readAudit @26 (sinceUnixMs :Int64, afterSeq :UInt64, app :Text, actions :List(Text), limit :UInt32)
      -> (lines :List(Text), lastSeq :UInt64, more :Bool);
  # Each line is one audit event as JSON: the trail is a free-form JSON
  # Lines document (ARCHITECTURE.md), so it crosses the wire as its lines.
  # The audit trail, oldest first: lines at or after sinceUnixMs (0 = any)
  # and after afterSeq (the follow cursor), of app ("" = any), whose action
  # is or is under one of actions (empty = all); at most limit lines (capped
  # at 5000); more when others matched.
  drainRunner @27 (id :Text) -> (id :Text);
  # Cordons the runner and moves its sandboxes to other ready runners, each
  # old one stopping once its replacement is healthy; answers the runner's
  # full id at once (follow with listRunners until it hosts none).
  testCiBinding @28 (app :Text, token :Text) -> (result :CiBindingTest);
  # What a CI login with token for app would make of it, without logging
  # in: the token's verification first, then every binding of the app
  # claim by claim. Changes nothing.
  createDeployKey @29 (app :Text, ttlSecs :UInt64, description :Text)
      -> (key :Text, info :DeployKeyInfo, clientSecret :Text);
  # A deploy key for app: `key` (miren_key_…, printed once; it holds the
  # secret), the record, and the secret apart (for OAuth clients set up by
  # hand). ttlSecs 0 = 90 days; at most a year.
  listDeployKeys @30 (app :Text) -> (keys :List(DeployKeyInfo));
  # app "" = every app. Never a secret.
  rotateDeployKey @31 (id :Text, overlapSecs :UInt64)
      -> (key :Text, info :DeployKeyInfo, clientSecret :Text);
  # A new secret; the old one works overlapSecs more.
  revokeDeployKey @32 (id :Text) -> (info :DeployKeyInfo);
  # Refused from the next request on.
  createCoordinatorCode @33 (ttlSecs :UInt64) -> (code :Text, expiresUnix :Int64);
  # A one-time code for another coordinator to join this cluster
  # (`miren server --etcd … --join CODE`): it carries every coordinator's
  # address and the CA fingerprint; the store keeps only its hash. Refused
  # unless the cluster runs on etcd. ttlSecs 0 = one hour.
}

interface App {
  # Confined to one app: everything a deploy pipeline needs, nothing else.
  uploadArtifact @0 () -> (upload :ArtifactUpload);
  deploy @1 (artifactSha256 :Text, services :List(ServiceSpec)) -> (version :Text);
  status @2 () -> (status :AppStatus);
  logs @3 (lines :UInt32) -> (sandboxes :List(SandboxLogs));
}

struct WorkloadClaims {
  # The claims of a verified workload token (identity::WorkloadClaims).
  iss @0 :Text;
  sub @1 :Text;
  aud @2 :List(Text);
  iat @3 :Int64;
  nbf @4 :Int64;
  exp @5 :Int64;
  jti @6 :Text;
  app @7 :Text;
  sandboxId @8 :Text;
  clusterId @9 :Text;
  organizationId @10 :Text;
  # Empty when the cluster has no organization.
}

enum VersionState {
  deploying @0;
  active @1;
  failed @2;
  superseded @3;
}

struct AppStatus {
  name @0 :Text;
  activeVersion @1 :Text;
  # Empty when no version is active.
  versions @2 :List(VersionStatus);
  sandboxes @3 :List(SandboxStatus);
}

struct VersionStatus {
  id @0 :Text;
  state @1 :VersionState;
  message @2 :Text;
  artifact @3 :Text;
  createdUnix @4 :Int64;
  services @5 :List(ServiceStatus);
}

struct ServiceStatus {
  name @0 :Text;
  instances @1 :UInt32;
  port @2 :UInt16;
  limits @3 :ResourceLimits;
}

struct SandboxStatus {
  # One sandbox assignment and what its runner reported of it.
  id @0 :Text;
  version @1 :Text;
  service @2 :Text;
  runner @3 :Text;
  retiring @4 :Bool;
  seen :union {
    reported @5 :ReportedSandbox;
    # Reported on the runner's live session.
    unknownSinceUnix @6 :Int64;
    # Nothing reported on a live session since then.
  }
}

struct ReportedSandbox {
  state @0 :SandboxState;
  atUnix @1 :Int64;
  restarts @2 :UInt32;
  address @3 :Text;
  lastExit @4 :Text;
}

struct SandboxLogs {
  sandbox @0 :Text;
  version @1 :Text;
  lines @2 :List(Text);
  error @3 :Text;
  # Why the runner gave no lines; empty when it did.
}

struct Route {
  host @0 :Text;
  # "" is the default route.
  app @1 :Text;
  oidc @2 :RouteOidc;
  # Unset when the route has no single sign-on.
}

struct RouteOidc {
  provider @0 :Text;
  claimHeaders @1 :List(Text);
  # CLAIM:HEADER
}

struct OidcProvider {
  # A stored provider as shown to people: its client secret never crosses
  # the wire.
  name @0 :Text;
  issuer @1 :Text;
  clientId @2 :Text;
  scope @3 :Text;
}

struct RouteOidcConfig {
  # What `route oidc enable` asks for. An unset text field was not given
  # (an empty one was given empty).
  provider @0 :Text;
  providerUrl @1 :Text;
  clientId @2 :Text;
  clientSecret @3 :Text;
  scope @4 :Text;
  claimHeaders @5 :List(Text);
  replaceProvider @6 :Bool;
}

struct RouteOidcShown {
  host @0 :Text;
  app @1 :Text;
  oidc @2 :ShownOidc;
  # Unset when the route is not protected.
}

struct ShownOidc {
  provider @0 :OidcProvider;
  # Unset when the provider record is gone.
  claimHeaders @1 :List(Text);
}
