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
}

struct SigningKey {
  kid @0 :Text;
  alg @1 :Text;
  state @2 :Text;
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

struct RunnerStatus {
  version @0 :Text;
  sandboxes @1 :UInt32;
  isolation @2 :Text;
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

struct SandboxReport {
  id @0 :Text;
  state @1 :Text;
  # starting | healthy | crashed | failed | stopped
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
  state @6 :Text;
  labels @7 :List(Label);
}

struct RunnerInfo {
  id @0 :Text;
  name @1 :Text;
  status @2 :Text;
  labels @3 :List(Label);
  sandboxes @4 :UInt32;
  lastSeenUnix @5 :Int64;
  version @6 :Text;
  cordoned @7 :Bool;
  isolation @8 :Text;
  certExpiresUnix @9 :Int64;
  limits @10 :Text;
}

interface Admin {
  status @0 () -> (status :ClusterStatus);
  mintWorkloadToken @1 (app :Text, sandboxId :Text, organization :Text,
                        audiences :List(Text), ttlSecs :UInt32) -> (token :Text);
  listSigningKeys @2 () -> (keys :List(SigningKey));
  rotateSigningKey @3 () -> (keys :List(SigningKey));
  verifyWorkloadToken @4 (token :Text, audience :Text) -> (claimsJson :Text);
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
  listApps @12 () -> (appsJson :Text);
  deleteApp @13 (app :Text) -> ();
  setRoute @14 (host :Text, app :Text) -> ();
  # host "" is the default route.
  listRoutes @15 () -> (routesJson :Text);
  removeRoute @16 (host :Text) -> ();
  addCiBinding @17 (bindingJson :Text) -> (id :Text);
  # The binding as identity::bindings::Binding JSON; the coordinator assigns
  # the id and re-validates every rule.
  listCiBindings @18 (app :Text) -> (bindingsJson :Text);
  removeCiBinding @19 (id :Text) -> ();
  routeOidcEnable @20 (host :Text, configJson :Text) -> ();
  # Labs (routeoidc). host "" is the default route.
  routeOidcShow @21 (host :Text) -> (json :Text);
  routeOidcDisable @22 (host :Text) -> ();
  listOidcProviders @23 () -> (json :Text);
  removeOidcProvider @24 (name :Text) -> ();
  renewAdmin @25 (csrDer :Data, validitySecs :UInt64) -> (certPem :Text);
  # A new admin certificate with the caller's own name for the key that
  # signed the PKCS#10 request (its subject is ignored; the key never leaves
  # the caller). validitySecs 0 = ten years; never past the CA's end. The
  # caller's current certificate keeps working until it expires.
  readAudit @26 (sinceUnixMs :Int64, afterSeq :UInt64, app :Text, actions :List(Text), limit :UInt32)
      -> (lines :List(Text), lastSeq :UInt64, more :Bool);
  # The audit trail, oldest first: lines at or after sinceUnixMs (0 = any)
  # and after afterSeq (the follow cursor), of app ("" = any), whose action
  # is or is under one of actions (empty = all); at most limit lines (capped
  # at 5000); more when others matched.
  drainRunner @27 (id :Text) -> (id :Text);
  # Cordons the runner and moves its sandboxes to other ready runners, each
  # old one stopping once its replacement is healthy; answers the runner's
  # full id at once (follow with listRunners until it hosts none).
  testCiBinding @28 (app :Text, token :Text) -> (explanations :List(Text));
  createDeployKey @29 (app :Text, ttlSecs :UInt64, description :Text) -> (key :Text, keyJson :Text);
  # A deploy key for app: `key` (miren_key_…, printed once; it holds the
  # secret) and the record as JSON (id, app, created, expires, the secret
  # apart as clientSecret). ttlSecs 0 = 90 days; at most a year.
  listDeployKeys @30 (app :Text) -> (keysJson :Text);
  # app "" = every app. Never a secret.
  rotateDeployKey @31 (id :Text, overlapSecs :UInt64) -> (key :Text, keyJson :Text);
  # A new secret; the old one works overlapSecs more.
  revokeDeployKey @32 (id :Text) -> (keyJson :Text);
  # Refused from the next request on.
}

interface App {
  # Confined to one app: everything a deploy pipeline needs, nothing else.
  uploadArtifact @0 () -> (upload :ArtifactUpload);
  deploy @1 (artifactSha256 :Text, services :List(ServiceSpec)) -> (version :Text);
  status @2 () -> (statusJson :Text);
  logs @3 (lines :UInt32) -> (logsJson :Text);
}
