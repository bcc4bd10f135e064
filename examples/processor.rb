# frozen_string_literal: true

# A standalone processor: serves ProcessorService (Process upper-cases payloads), registers
# with a control plane and sends a heartbeat with its metrics every few seconds until Ctrl-C.
#
#   flowctl-controlplane --port 50051 &                       # or any flow control plane
#   FLOWCTL_ENDPOINT=127.0.0.1:50051 ruby -Ilib examples/processor.rb
#
# Environment: FLOWCTL_ENDPOINT (the control plane, default 127.0.0.1:50051), FLOWCTL_AUTH_TOKEN
# (its bearer token, if any), PORT (where to serve Process; default: a free port),
# HEARTBEAT_INTERVAL (seconds, default 5).
$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"

$stdout.sync = true

class Upcaser
  attr_reader :count

  def initialize = @count = 0

  def get_capabilities(_request, _call)
    { name: "upcaser", version: Flowctl::VERSION, description: "upper-cases payloads",
      input_event_types: ["text"], output_event_types: ["text.upper"] }
  end

  def process(requests, _call)
    requests.each do |msg|
      @count += 1
      yield Flowctl::Processor::DataMessage.new(payload: msg.payload.upcase, metadata: msg.metadata)
    end
  end
end

control_plane = ENV.fetch("FLOWCTL_ENDPOINT", "127.0.0.1:50051")
headers = ENV["FLOWCTL_AUTH_TOKEN"] ? { "authorization" => "Bearer #{ENV['FLOWCTL_AUTH_TOKEN']}" } : {}
interval = Float(ENV.fetch("HEARTBEAT_INTERVAL", 5))

handler = Upcaser.new
server = Flowctl::Server.new(port: Integer(ENV.fetch("PORT", 0)), tls: false)
server.handle(Flowctl::Processor::Service, handler)
port = server.start
cp = Flowctl::ControlPlane::Client.new(control_plane, tls: false, headers: headers)

register = lambda do
  reply = cp.register_processor(endpoint: "127.0.0.1:#{port}", metadata: { "example" => "upcaser" })
  puts "registered with #{control_plane} as #{reply.processor_id}"
  reply.processor_id
end

wake, waker = IO.pipe # the trap only writes a byte
%w[INT TERM].each { |sig| trap(sig) { waker.write_nonblock(".", exception: false) } }
begin
  id = register.call
  puts "serving Process on 127.0.0.1:#{port}; Ctrl-C stops"
  loop do
    beat = cp.processor_heartbeat(processor_id: id, status: "HEALTHY", timestamp: Time.now,
                                  metrics: { "processed" => handler.count.to_f })
    id = register.call unless beat.success # the control plane forgot us (restarted): register again
    break if IO.select([wake], nil, nil, interval)
  end
  cp.processor_heartbeat(processor_id: id, status: "STOPPING", timestamp: Time.now,
                         metrics: { "processed" => handler.count.to_f })
rescue Flowctl::RPCError => e
  warn "control plane #{control_plane}: #{e.message}"
  exit 1
ensure
  cp.close
  server.stop(grace: 2)
end
puts "stopped after #{handler.count} message(s)"
