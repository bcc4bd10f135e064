# frozen_string_literal: true

# fuzz/beat_target.c's oracle for ext/flowctl/beat_table.c: the table takes a heartbeat in
# natively only when the Ruby handler would have taken it the same way. Before each input the
# table holds the components of BASE, fresh; after flowctl_beat_table_apply, #check says:
# - nothing, when the table declined (the call would go to Ruby: always safe);
# - when it took the bytes in: HeartbeatRequest.decode accepts them; the id is published; the
#   status is UNKNOWN or the stored one; the metrics stay within the limits; and what the table
#   took in (Native::BeatTable#take) is exactly what Store#heartbeat would merge: the metrics
#   whose value changed, one heartbeat, the bytes grown as Store#metric_bytes counts them.
# Anything else raises (a crash for libFuzzer).
module FuzzBeats
  MAX_METRICS = 8
  MAX_METRIC_BYTES = 64
  OBJECT = 40
  BASE = { "p1" => [2, { "events" => "1", "lag" => "3" }], "p2" => [-1, { "x" => 1.0 }], "" => [5, {}] }.freeze

  module_function

  def table = @table ||= Flowctl::Native::BeatTable.new(MAX_METRICS, MAX_METRIC_BYTES)

  def reset
    BASE.each do |id, (status, metrics)|
      table.take(id)
      table.put(id, status, 0, metrics, 1 << 40)
    end
    nil
  end

  def warm_up
    reset
    check("\n\x02p1".b, false)
  end

  def check(bytes, taken)
    request = begin
      Flowctl::V1::HeartbeatRequest.decode(bytes)
    rescue Flowctl::DecodeError
      nil
    end
    return :declined unless taken
    raise "taken in, but the decoder refuses #{bytes.inspect}" unless request

    status, base = BASE.fetch(request.service_id) { raise "taken in for an unknown id #{request.service_id.inspect}" }
    code = request.status.is_a?(Symbol) ? Flowctl::V1::HealthStatus.value(request.status) : request.status
    raise "taken in with status #{code} (stored #{status})" unless code.zero? || code == status

    metrics = request.metrics
    raise "taken in past max_metrics: #{metrics.inspect}" if (base.keys | metrics.keys).size > MAX_METRICS
    metrics.each { |k, v| raise "taken in past max_metric_bytes: #{k.inspect}" if k.bytesize + v.bytesize > MAX_METRIC_BYTES }
    got, _last, beats, growth = table.take(request.service_id)
    raise "taken in, nothing to fold" if beats.nil?
    raise "#{beats} heartbeats for one" unless beats == 1

    want = metrics.reject { |k, v| base[k] == v }
    raise "folds #{got.inspect}, Ruby merges #{want.inspect}" unless got == want

    grown = metrics.sum do |k, v|
      old = base[k]
      old.nil? ? k.bytesize + v.bytesize + 2 * OBJECT : v.bytesize - (old.is_a?(String) ? old.bytesize : 8)
    end
    raise "grew by #{growth}, Ruby counts #{grown}" unless growth == grown

    :taken
  end
end
