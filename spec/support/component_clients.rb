# frozen_string_literal: true

# The gem's flowctl.v1 clients (Flowctl::V1::SourceClient, ...), or, where the gem does not
# define one, the same built from its service with Flowctl::Client.use_service.
module ComponentClients
  def self.[](kind)
    base = kind.to_s.split("_").map(&:capitalize).join
    name = :"#{base}Client"
    return Flowctl::V1.const_get(name, false) if Flowctl::V1.const_defined?(name, false)

    (@built ||= {})[name] ||= Class.new(Flowctl::Client) { use_service Flowctl::V1.const_get(:"#{base}Service") }
  end
end
