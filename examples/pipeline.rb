# frozen_string_literal: true

# The gem's main job, end to end, on 127.0.0.1 (ephemeral ports, nothing else needed):
#
#   1. the embedded control plane (Flowctl::ControlPlane::Registry) runs on a Flowctl::Server,
#      guarded by a bearer token;
#   2. a processor written with this gem serves ProcessorService (Process: a bidi stream that
#      turns raw payment events into enriched ones; GetCapabilities), registers with the
#      control plane and sends heartbeats with its metrics;
#   3. a consumer app registers, asks the processor what it does, streams events through
#      Process, prints every reply as it comes back, and reports its own heartbeat;
#   4. it prints what the control plane knows, stops everything, and exits 0.
#
#   ruby -Ilib examples/pipeline.rb          (or script/demo, which installs what it needs first)
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
require "json"

$stdout.sync = true
TOKEN = "demo-token"
AUTH = { "authorization" => "Bearer #{TOKEN}" }.freeze

# --- the processor ---------------------------------------------------------------------
# Turns {"from":..,"to":..,"amount":..} payloads into enriched events; counts what it did.
class PaymentEnricher
  attr_reader :processed, :rejected

  FEE_RATE = 0.003

  def initialize
    @processed = 0
    @rejected = 0
    @lock = Mutex.new
  end

  def get_capabilities(_request, _call)
    Flowctl::Processor::CapabilitiesResponse.new(
      processor_id: "payment-enricher", name: "payment-enricher", version: Flowctl::VERSION,
      description: "adds fees, size class and a sequence number to payment events",
      input_event_types: ["payment.raw"], output_event_types: ["payment.enriched"], max_concurrent: 8
    )
  end

  # bidi: read events as they arrive, yield one enriched event per input
  def process(requests, _call)
    requests.each_with_index do |msg, seq|
      event = JSON.parse(msg.payload)
      amount = Float(event.fetch("amount"))
      enriched = event.merge("fee" => (amount * FEE_RATE).round(4), "class" => amount >= 1000 ? "large" : "small",
                             "seq" => seq)
      count(:processed)
      yield Flowctl::Processor::DataMessage.new(
        payload: JSON.generate(enriched),
        metadata: msg.metadata.merge("type" => "payment.enriched", "processed-by" => "payment-enricher")
      )
    rescue JSON::ParserError, KeyError, ArgumentError => e
      count(:rejected)
      raise Flowctl::InvalidArgument, "event #{seq}: #{e.message}"
    end
  end

  private

  def count(what) = @lock.synchronize { instance_variable_set(:"@#{what}", instance_variable_get(:"@#{what}") + 1) }
end

def section(title) = puts("\n== #{title}")

def wait_until(what, seconds = 5)
  deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
  until yield
    raise "gave up waiting for #{what}" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

    sleep 0.02
  end
end

servers = []
heartbeat = nil
clients = []
begin
  # 1. the embedded control plane
  registry = Flowctl::ControlPlane::Registry.new(ttl: 10)
  control_plane = Flowctl::Server.new(host: "127.0.0.1", port: 0, tls: false, auth_token: TOKEN)
  control_plane.handle(Flowctl::ControlPlane::Service, registry)
  cp_port = control_plane.start
  servers << control_plane
  cp_target = "127.0.0.1:#{cp_port}"
  section "control plane listening on #{cp_target} (bearer token required)"

  # 2. the processor: serves Process, registers, beats
  enricher = PaymentEnricher.new
  processor_server = Flowctl::Server.new(port: 0, tls: false)
  processor_server.handle(Flowctl::Processor::Service, enricher)
  proc_port = processor_server.start
  servers << processor_server
  proc_cp = Flowctl::ControlPlane::Client.new(cp_target, tls: false, headers: AUTH)
  clients << proc_cp
  reg = proc_cp.register_processor(endpoint: "127.0.0.1:#{proc_port}",
                                   metadata: { "input" => "payment.raw", "output" => "payment.enriched" })
  processor_id = reg.processor_id
  puts "processor registered: #{reg.message} (serving Process on 127.0.0.1:#{proc_port})"
  # heartbeats from a native thread: the first at once, then every 0.2 s, without the GVL
  heartbeat = proc_cp.start_heartbeat(:processor, id: processor_id, interval: 0.2, status: :HEALTHY,
                                      metrics: { "processed" => 0.0, "rejected" => 0.0 })
  wait_until("the first heartbeat") { heartbeat.stats[:sent].positive? }
  puts "processor heartbeat thread running: #{heartbeat.stats.slice(:sent, :failed)}"

  # 3. the consumer app
  app_cp = Flowctl::ControlPlane::Client.new(cp_target, tls: false, headers: AUTH)
  clients << app_cp
  consumer_id = app_cp.register_consumer(consumer_id: "payments-dashboard", endpoint: "",
                                         metadata: { "team" => "payments" }).consumer_id
  puts "consumer registered as #{consumer_id}"

  processor = Flowctl::Processor::Client.new("127.0.0.1:#{proc_port}", tls: false)
  clients << processor
  caps = processor.get_capabilities
  section "processor capabilities"
  puts "#{caps.name} #{caps.version}: #{caps.description}"
  puts "in: #{caps.input_event_types.join(', ')}  out: #{caps.output_event_types.join(', ')}  " \
       "max_concurrent: #{caps.max_concurrent}"

  events = [
    { "from" => "alice", "to" => "bob", "amount" => 25.0 },
    { "from" => "bob", "to" => "carol", "amount" => 1200.0 },
    { "from" => "carol", "to" => "dave", "amount" => 7.5 },
    { "from" => "dave", "to" => "alice", "amount" => 3100.0 },
    { "from" => "erin", "to" => "bob", "amount" => 99.99 }
  ]
  requests = events.each_with_index.map do |e, i|
    Flowctl::Processor::DataMessage.new(payload: JSON.generate(e), metadata: { "type" => "payment.raw", "id" => "evt-#{i}" })
  end

  section "streaming #{requests.size} events through Process"
  replies = 0
  processor.process(requests) do |reply|
    replies += 1
    puts "<- #{reply.metadata['id']} #{reply.metadata['type']}: #{reply.payload}"
  end

  # a bad event: the processor answers INVALID_ARGUMENT for that stream only
  begin
    processor.process([Flowctl::Processor::DataMessage.new(payload: "not json")]) { |r| puts "unexpected: #{r.payload}" }
  rescue Flowctl::InvalidArgument => e
    puts "bad event rejected as expected: #{e.class}: #{e.details}"
  end

  # heartbeats carry what both sides did: the processor's next native beat sends its new metrics
  heartbeat.metrics = { "processed" => enricher.processed, "rejected" => enricher.rejected }
  sent = heartbeat.stats[:sent]
  wait_until("two more heartbeats") { heartbeat.stats[:sent] >= sent + 2 }
  app_cp.consumer_heartbeat(consumer_id: consumer_id, status: "HEALTHY", timestamp: Time.now,
                            metrics: { "received" => replies.to_f })
  ghost = app_cp.source_heartbeat(source_id: "never-registered", status: "HEALTHY")
  puts "heartbeat for an unknown source: success=#{ghost.success} (#{ghost.message})"

  # without the token the control plane refuses
  begin
    Flowctl::ControlPlane::Client.new(cp_target, tls: false).tap { |c| clients << c }.register_source(source_id: "intruder")
  rescue Flowctl::Unauthenticated => e
    puts "call without the token refused: #{e.class}"
  end

  # 4. what the control plane knows
  section "control plane: #{registry.size} component(s)"
  puts registry.table, ""
  registry.components.each do |c|
    puts "#{c.kind} #{c.id}: endpoint=#{c.endpoint.empty? ? '-' : c.endpoint} metadata=#{c.metadata} " \
         "status=#{c.status} metrics=#{c.metrics} stale=#{c.stale?}"
  end

  ok = replies == events.size && registry.components.size == 2
  section(ok ? "pipeline OK: #{replies} events processed" : "pipeline FAILED")
  exit_code = ok ? 0 : 1
ensure
  heartbeat&.stop # a last beat with status STOPPING
  clients.each(&:close)
  servers.reverse_each { |s| s.stop(grace: 2) }
end
exit(exit_code || 1)
