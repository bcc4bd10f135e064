# frozen_string_literal: true

# proto3 JSON benchmark: Flowctl's encode_json/decode_json (lib/flowctl/json.rb; printing in
# C, ext/flowctl/json_write.c) against google-protobuf 3.21's (upb, C), same messages, one run.
#
#   ruby bench/json.rb            # 3 rounds of 0.5 s per measurement, best round counts
#   BENCH_SECONDS=1 BENCH_ROUNDS=5 ruby bench/json.rb
#
# Messages: a flowctl.v1 HeartbeatRequest (id, enum, 3 metrics), one with 40 metrics, an
# Event with a 1 KiB payload, 2 metadata entries, a Timestamp and a cursor, and a
# ListComponentsResponse of 50 ComponentStatusResponses (a large message). The texts of
# both gems must be equal byte for byte before anything is timed (BENCH_ANY_ORDER=1 lets an
# older flowctl that printed maps in Hash order run: docs/performance.md's "before"). The official classes are spec/gen/official_v1's,
# looked up by name. Ratios are flowctl/google (> 1.0 = flowctl faster).

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
$LOAD_PATH.unshift File.expand_path("../spec/gen/official_v1", __dir__)
require "flowctl"
require "google/protobuf"
%w[common control_plane].each { |f| require "official_flowctl/v1/#{f}_pb" }
require_relative "support"

def official(klass) = Google::Protobuf::DescriptorPool.generated_pool.lookup(klass.descriptor_name).msgclass

V1 = Flowctl::V1
info = { id: "proc-1", name: "square", version: "1.0.0", type: :COMPONENT_TYPE_PROCESSOR,
         input_event_types: ["raw"], output_event_types: ["squared"], endpoint: "127.0.0.1:50051",
         metadata: { "zone" => "a", "owner" => "team" } }
status = { component: info, status: :HEALTH_STATUS_HEALTHY, last_heartbeat: Time.at(1_700_000_000, 5_000_000, :nsec),
           metrics: { "events" => "12345", "errors" => "0" }, registered_at: Time.at(1_690_000_000) }
messages = {
  "heartbeat" => V1::HeartbeatRequest.new(service_id: "proc-1", status: :HEALTH_STATUS_HEALTHY,
                                          metrics: { "events" => "12345", "errors" => "0", "lag_ms" => "3" }),
  "heartbeat, 40 metrics" => V1::HeartbeatRequest.new(service_id: "proc-1", status: :HEALTH_STATUS_HEALTHY,
                                                      metrics: Array.new(40) { |i| ["metric_#{i}", (i * 37).to_s] }.to_h),
  "event 1 KiB" => V1::Event.new(id: "ev-1", type: "raw", payload: Random.new(1).bytes(1024),
                                 metadata: { "content-type" => "application/octet-stream", "source" => "stellar" },
                                 timestamp: Time.at(1_700_000_000, 123_456_789, :nsec),
                                 stellar_cursor: { ledger_sequence: 51_234_567, index_in_ledger: 3 }),
  "list of 50 components" => V1::ListComponentsResponse.new(components: Array.new(50) { status })
}

table = Bench::Table.new("flowctl", "google")
messages.each do |label, msg|
  klass = msg.class
  off = official(klass).decode(msg.to_proto)
  text = klass.encode_json(msg)
  raise "#{label}: the texts differ" unless text == official(klass).encode_json(off) || ENV["BENCH_ANY_ORDER"]

  puts "#{label}: #{text.bytesize} bytes of JSON"
  table.row("encode_json #{label}", flowctl: -> { klass.encode_json(msg) }, google: -> { official(klass).encode_json(off) })
  table.row("decode_json #{label}", flowctl: -> { klass.decode_json(text) }, google: -> { official(klass).decode_json(text) })
end
puts
table.print
