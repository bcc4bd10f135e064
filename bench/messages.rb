# frozen_string_literal: true

# Message layer benchmark: the same work with flowctl and with the official google-protobuf
# gem (classes protoc generated from the same proto/ files, spec/gen), in one run.
#
#   ruby bench/messages.rb            # 3 rounds of 0.5 s per measurement, best round counts
#   BENCH_SECONDS=1 BENCH_ROUNDS=5 ruby bench/messages.rb
#
# For a ProcessorHeartbeatRequest (id, a timestamp, 3 metrics, status) and a DataMessage
# with a 1 KiB payload and 2 metadata entries it measures:
#   build        Klass.new with every field
#   encode       to_proto / Klass.encode of a built message
#   decode+read  Klass.decode, then read every field (iterating the map)
# and prints ops/s for both and the ratio flowctl/google (> 1.0 = flowctl faster), then the
# Ruby objects each op allocates. The target is a ratio >= 1.0 on every row.
#
# Reading a Timestamp: flowctl returns a Time (that is its API); for google-protobuf the
# cheapest equivalent, reading #seconds and #nanos, is timed (no Time is built), so the
# comparison does not favour flowctl.

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
$LOAD_PATH.unshift File.expand_path("../spec/gen", __dir__)
require "flowctl"
require "google/protobuf"
require "controlplane/controlplane_pb"
require "processor/processor_pb"
require_relative "support"

FHb = Flowctl::ControlPlane::ProcessorHeartbeatRequest
GHb = Obsrvr::Flow::Controlplane::ProcessorHeartbeatRequest
FData = Flowctl::Processor::DataMessage
GData = Obsrvr::Flow::Processor::DataMessage

TIME = Time.at(1_700_000_000, 123_456_789, :nsec)
SECS = TIME.to_i
NANOS = TIME.nsec
METRICS = { "records_processed" => 12_345.0, "latency_ms" => 3.25, "errors" => 0.0 }.freeze
PAYLOAD = Random.new(1).bytes(1024).freeze
META = { "content-type" => "application/octet-stream", "source" => "stellar-live-source" }.freeze

def f_hb = FHb.new(processor_id: "ttp-processor-1", timestamp: TIME, metrics: METRICS, status: "HEALTHY")

def g_hb
  GHb.new(processor_id: "ttp-processor-1", timestamp: Google::Protobuf::Timestamp.new(seconds: SECS, nanos: NANOS),
          metrics: METRICS, status: "HEALTHY")
end

def f_data = FData.new(payload: PAYLOAD, metadata: META)
def g_data = GData.new(payload: PAYLOAD, metadata: META)

def f_read_hb(m)
  m.processor_id
  t = m.timestamp
  t.to_i
  m.metrics.each { |k, v| k && v }
  m.status
end

def g_read_hb(m)
  m.processor_id
  t = m.timestamp
  t.seconds
  t.nanos
  m.metrics.each { |k, v| k && v }
  m.status
end

def read_data(m)
  m.payload
  m.metadata.each { |k, v| k && v }
end

# Both gems must agree on the work before it is timed.
def check!
  fb = f_hb.to_proto
  gb = GHb.encode(g_hb)
  raise "heartbeat bytes differ in size" unless fb.bytesize == gb.bytesize
  raise "google reads flowctl's heartbeat differently" unless GHb.decode(fb) == g_hb
  raise "flowctl reads google's heartbeat differently" unless FHb.decode(gb) == f_hb
  raise "data bytes differ in size" unless f_data.to_proto.bytesize == GData.encode(g_data).bytesize
  raise "google reads flowctl's data differently" unless GData.decode(f_data.to_proto) == g_data
  raise "flowctl reads google's data differently" unless FData.decode(GData.encode(g_data)) == f_data
end

# Ruby objects allocated by one call of the block (averaged over 1000).
def allocations(&block)
  block.call
  GC.disable
  before = GC.stat(:total_allocated_objects)
  1000.times { block.call }
  (GC.stat(:total_allocated_objects) - before) / 1000.0
ensure
  GC.enable
end

check!
puts "flowctl #{Flowctl::VERSION} vs google-protobuf #{Gem.loaded_specs['google-protobuf']&.version || '(Debian)'}, " \
     "ruby #{RUBY_VERSION}, best of #{Bench::ROUNDS} rounds of #{Bench::SECONDS}s per measurement"
puts "heartbeat: #{f_hb.to_proto.bytesize} bytes; data message: #{f_data.to_proto.bytesize} bytes"
puts

fhb_msg = f_hb
ghb_msg = g_hb
fhb_bin = fhb_msg.to_proto
ghb_bin = GHb.encode(ghb_msg)
fd_msg = f_data
gd_msg = g_data
fd_bin = fd_msg.to_proto
gd_bin = GData.encode(gd_msg)

work = {
  "heartbeat build" => [-> { f_hb }, -> { g_hb }],
  "heartbeat encode" => [-> { fhb_msg.to_proto }, -> { GHb.encode(ghb_msg) }],
  "heartbeat decode+read" => [-> { f_read_hb(FHb.decode(fhb_bin)) }, -> { g_read_hb(GHb.decode(ghb_bin)) }],
  "data 1KiB build" => [-> { f_data }, -> { g_data }],
  "data 1KiB encode" => [-> { fd_msg.to_proto }, -> { GData.encode(gd_msg) }],
  "data 1KiB decode+read" => [-> { read_data(FData.decode(fd_bin)) }, -> { read_data(GData.decode(gd_bin)) }]
}

table = Bench::Table.new("flowctl", "google")
work.each { |label, (f, g)| table.row(label, flowctl: f, google: g) }

puts
puts format("%-34s  %12s  %12s", "Ruby objects allocated per op", "flowctl", "google")
work.each do |label, (f, g)|
  puts format("%-34s  %12.1f  %12.1f", label, allocations(&f), allocations(&g))
end

slower = table.rows.reject { |r| table.ratio(r) >= 1.0 }
puts
if slower.empty?
  puts "target met: flowctl is at least as fast as google-protobuf on every row"
else
  puts "target missed on: #{slower.map { |r| format('%s (%.2fx)', r.label, table.ratio(r)) }.join(', ')}"
end

# Messages of a descriptor set loaded at run time against the built-in ones: bench/descriptor_set.rb.
