# frozen_string_literal: true

require_relative "spec_helper"
require "open3"
require "tmpdir"

RSpec.describe Flowctl::Component::Metrics do
  subject(:metrics) { described_class.new }

  def promtool_check(text)
    out, status = Open3.capture2e("promtool", "check", "metrics", stdin_data: text)
    [status.success?, out]
  end

  it "counts events, failures, in-flight and latency" do
    metrics.begin_event
    expect(metrics.in_flight).to eq(1)
    metrics.end_event(0.002, emitted: 3)
    metrics.begin_event
    metrics.end_event(0.2, failed: true)
    metrics.dropped(2)
    n = metrics.to_numbers
    expect(n).to include("events_received" => 2, "events_emitted" => 3, "events_failed" => 1, "events_dropped" => 2,
                         "in_flight" => 0, "latency_p50_ms" => 2.5, "latency_p99_ms" => 250.0)
    expect(n["latency_avg_ms"]).to be_within(0.001).of(101.0)
    expect(n["last_event_time"]).to be_within(2).of(Time.now.to_f)
  end

  it "gives the heartbeat map as Strings, with the last event time in RFC 3339" do
    expect(metrics.to_heartbeat["last_event_time"]).to eq("")
    metrics.begin_event
    metrics.end_event(0.001)
    metrics.increment("rows", 5)
    metrics.set("lag", 1.5)
    hb = metrics.to_heartbeat
    expect(hb.values).to all(be_a(String))
    expect(hb).to include("events_received" => "1", "rows" => "5", "lag" => "1.5", "in_flight" => "0")
    expect(hb["last_event_time"]).to match(/\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\z/)
  end

  it "refuses bad names and values for the component's own metrics" do
    expect { metrics.increment("bad name") }.to raise_error(ArgumentError, /must match/)
    expect { metrics.increment("events_failed") }.to raise_error(ArgumentError, /standard metric/)
    expect { metrics.increment("x", -1) }.to raise_error(TypeError, /non-negative/)
    expect { metrics.set("g", Float::NAN) }.to raise_error(TypeError, /finite/)
    expect { metrics.set("g", "3") }.to raise_error(TypeError, /finite number/)
  end

  it "is valid Prometheus text for promtool, before and after events" do
    ok, out = promtool_check(metrics.to_prometheus("p1"))
    expect(ok).to be(true), out
    100.times do |i|
      metrics.begin_event
      metrics.end_event(i / 1000.0, emitted: 1, failed: i.odd?)
    end
    metrics.increment("rows_written", 7)
    metrics.increment("bytes_total", 9)
    metrics.set("queue_depth", 3)
    text = metrics.to_prometheus(%(we"ird\\id\n))
    ok, out = promtool_check(text)
    expect(ok).to be(true), "#{out}\n#{text}"
    expect(text).to include(%(flowctl_component_events_received_total{component="we\\"ird\\\\id\\n"} 100))
    expect(text).to match(/^flowctl_component_processing_seconds_count\{component="[^}]*"\} 100$/)
    expect(text).to include("rows_written_total{", "bytes_total{", "queue_depth{")
    expect(text).to match(/processing_seconds_bucket\{component="[^}]*",le="\+Inf"\} 100/)
  end

  it "stays consistent under concurrent updates" do
    threads = Array.new(4) do
      Thread.new do
        500.times do
          metrics.begin_event
          metrics.end_event(0.0001, emitted: 1)
          metrics.increment("mine")
        end
      end
    end
    threads.each(&:join)
    expect(metrics.to_numbers).to include("events_received" => 2000, "events_emitted" => 2000, "in_flight" => 0, "mine" => 2000)
  end

  it "adds each stream's tally into every snapshot and keeps its counts once the stream retires it" do
    a = metrics.tally
    b = metrics.tally
    now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    a.begin_event
    a.end_event(0.00004, now, 2, false) # first bucket (<= 50 µs)
    a.begin_event
    b.begin_event
    b.end_event(20.0, now, 0, true) # +Inf
    b.emitted!(3)
    n = metrics.to_numbers
    expect(n).to include("events_received" => 3, "events_emitted" => 5, "events_failed" => 1, "in_flight" => 1)
    expect(n["last_event_time"]).to be_within(2).of(Time.now.to_f)
    snap = metrics.snapshot
    expect([snap[:buckets].first, snap[:buckets].last, snap[:buckets].sum]).to eq([1, 1, 2])
    expect(snap[:latency_sum]).to be_within(1e-9).of(20.00004)
    a.end_event(0.003, now, 1, false)
    metrics.retire(a)
    metrics.retire(b)
    metrics.retire(b) # twice: counted once
    expect(metrics.to_numbers).to include("events_received" => 3, "events_emitted" => 6, "events_failed" => 1,
                                          "in_flight" => 0, "latency_p99_ms" => 20_000.0)
    expect(metrics.snapshot[:buckets].sum).to eq(3)
    threads = Array.new(4) do
      Thread.new do
        t = metrics.tally
        500.times do
          t.begin_event
          t.end_event(0.0001, Process.clock_gettime(Process::CLOCK_MONOTONIC), 1, false)
        end
        metrics.retire(t)
      end
    end
    threads.each(&:join)
    expect(metrics.to_numbers).to include("events_received" => 2003, "events_emitted" => 2006, "in_flight" => 0)
  end
end
